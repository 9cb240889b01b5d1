"""The E path of a stage worker: media looked up in the embedding cache by their key, misses decoded
(the gateway ships compressed bytes and a plan) and run through the next vision batch, packed
embeddings held in leased slots for a peer to pull; and the P side's pull of them into its own slots.
Mixed into `StageWorker`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

from serving.stages.embeddings import image_key
from serving.stages.loop import Encoded, VisionBatchFailed
from serving.types import (
    EmbeddingRef,
    MediaItem,
    MediaRejected,
    RequestFailed,
    Role,
    StageTimings,
    WorkerUnavailable,
)

# What a stage is handed to encode: media the gateway planned (bytes, decoded here), or pixels a local
# caller decoded itself.
Media = MediaItem | np.ndarray
T = TypeVar("T")


class EncodePath:
    def encode(
        self: Any, request_id: str, images: list[Media], keep: list[int] | None = None
    ) -> EmbeddingRef:
        """Encode the request's media (what pruning keeps of each: `keep`) and hold the embeddings
        for a prefill worker to pull."""
        self.ledger.admit(request_id, Role.ENCODE)
        try:
            return self._encode(request_id, images, keep or [])
        except BaseException:
            self._quiet_free(request_id)
            raise

    def _encode(self: Any, request_id: str, images: list[Media], keep: list[int]) -> EmbeddingRef:
        timings = StageTimings()

        def hold(packed: torch.Tensor, kept: list[list[int] | None] | None) -> EmbeddingRef:
            rows = packed.shape[0]
            if not self._room(rows):
                raise WorkerUnavailable("no embedding slots free")
            slots = self.embeddings.allocate(rows)
            self.embeddings.write(slots, packed)
            lease = self._hold(request_id, Role.ENCODE, lambda: self.embeddings.free(slots))
            source = self.transport.publish("emb", self.embeddings.regions(slots, rows))
            return EmbeddingRef(source, rows, lease, timings, kept)

        return self._embed_images(request_id, images, keep, timings, hold)

    def _embed_images(
        self: Any,
        request_id: str,
        images: list[Media],
        keep: list[int],
        timings: StageTimings,
        then: Callable[[torch.Tensor, list[list[int] | None] | None], T],
    ) -> T:
        """The media's packed embeddings, from the cache where possible (whole: pruning applies after,
        so one entry serves every rate), cut to what pruning keeps (`keep`, per item), and the kept
        tokens' indices per item, handed to `then` on the engine thread -- in the same pass as their
        vision batch, so what follows (admission, holding them for a peer) waits for no further step.
        Returns what `then` returns; sets the media, encode and encode-queue timings."""
        keys = [im.key if isinstance(im, MediaItem) else image_key(im) for im in images]
        found = [self.cache.get(k) for k in keys]
        missing = [i for i, hit in enumerate(found) if hit is None]
        inputs = self.engine.inputs
        items = [(inputs.grid(im), im.video if isinstance(im, MediaItem) else im.ndim == 4) for im in images]

        def finish(fresh: list[torch.Tensor]) -> T:
            for i, emb in zip(missing, fresh, strict=True):
                self.cache.put(keys[i], emb)
                found[i] = emb
            rows, kept = self.engine.prune(found, items, keep)
            return then(torch.cat(rows), kept)

        if not missing:  # all cached: the encode stage took no time
            timings.encode_s = timings.encode_queue_s = 0.0
            return self.loop.call(lambda: finish([]))
        start = time.perf_counter()
        pixels = self._decode([images[i] for i in missing])
        processed = [inputs.process(p) for p in pixels]
        for i, p in zip(missing, processed, strict=True):
            item = images[i]
            if isinstance(item, MediaItem) and tuple(p.grid_thw) != inputs.grid(item):
                raise RequestFailed("the media did not match their plan", Role.ENCODE)
        timings.media_s = time.perf_counter() - start

        def encoded(done: Encoded) -> T:
            timings.encode_s, timings.encode_queue_s = done.run_s, done.queued_s
            return finish(done.embeds)

        try:
            return self.loop.encode(request_id, processed, encoded)
        except VisionBatchFailed as exc:  # this request's media failed, alone
            raise RequestFailed("the images could not be encoded", Role.ENCODE) from exc.__cause__

    def _decode(self: Any, media: list[Media]) -> list[np.ndarray]:
        """Pixels of each item: planned items decoded on the worker's decode threads."""
        items = [m for m in media if isinstance(m, MediaItem)]
        if not items:
            return list(media)
        try:
            decoded = iter(self.decoder.decode(items))
        except MediaRejected:
            raise
        except Exception as exc:  # noqa: BLE001 - a decoder's own failure fails this request alone
            raise RequestFailed("the media could not be decoded", Role.ENCODE) from exc
        return [next(decoded) if isinstance(m, MediaItem) else m for m in media]

    def _room(self: Any, rows: int) -> bool:
        return self.embeddings.num_free >= self.embeddings.slots_for(rows)

    def _pull_embeddings(
        self: Any,
        request_id: str,
        ref: EmbeddingRef,
        timings: StageTimings,
        then: Callable[[torch.Tensor], T],
    ) -> T:
        """Pull the embeddings into slots of this worker, then, on the engine thread, read them out,
        free the slots and hand them to `then`; returns what `then` returns."""

        def take() -> list[int] | None:
            if not self._room(ref.num_tokens):
                return None
            slots = self.embeddings.allocate(ref.num_tokens)
            self.ledger.update(request_id, lambda e: e.slot_lists.append(slots))
            return slots

        slots = self._wait_for(take)
        start = time.perf_counter()
        regions = self.embeddings.regions(slots, ref.num_tokens)
        self._transfer(ref.source, "emb", regions, ref.lease_id)
        timings.e2p_transfer_s = time.perf_counter() - start
        timings.e2p_bytes = float(ref.source.nbytes)

        def read_and_free() -> T:
            out = self.embeddings.read(slots, ref.num_tokens)
            self.embeddings.free(slots)
            self.ledger.update(request_id, lambda e: e.slot_lists.remove(slots))
            return then(out)

        return self.loop.call(read_and_free)
