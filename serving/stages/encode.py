"""The E path of a stage worker: media looked up in the embedding cache by their key, misses decoded
(the gateway ships compressed bytes and a plan) and run through the next vision batch, packed
embeddings held in leased slots for a peer to pull; and the P side's pull of them into its own slots.
Mixed into `StageWorker`."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from serving.stages.embeddings import image_key
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
        start = time.perf_counter()
        packed, kept, run_s = self._embed_images(request_id, images, keep)
        rows = packed.shape[0]

        def hold() -> EmbeddingRef:
            if not self._room(rows):
                raise WorkerUnavailable("no embedding slots free")
            slots = self.embeddings.allocate(rows)
            self.embeddings.write(slots, packed)
            lease = self._hold(request_id, Role.ENCODE, lambda: self.embeddings.free(slots))
            source = self.transport.publish("emb", self.embeddings.regions(slots, rows))
            timings = StageTimings(encode_s=run_s, encode_queue_s=time.perf_counter() - start - run_s)
            return EmbeddingRef(source, rows, lease, timings, kept)

        return self.loop.call(hold)

    def _embed_images(
        self: Any, request_id: str, images: list[Media], keep: list[int]
    ) -> tuple[torch.Tensor, list[list[int] | None] | None, float]:
        """Packed embeddings of the media, from the cache where possible (whole: pruning applies
        after, so one entry serves every rate), cut to what pruning keeps (`keep`, per item); the kept
        tokens' indices per item; and the vision time."""
        keys = [im.key if isinstance(im, MediaItem) else image_key(im) for im in images]
        found = self.loop.call(lambda: [self.cache.get(k) for k in keys])
        missing = [i for i, hit in enumerate(found) if hit is None]
        run_s = 0.0
        if missing:
            pixels = self._decode([images[i] for i in missing])
            processed = [self.engine.inputs.process(p) for p in pixels]
            for i, p in zip(missing, processed, strict=True):
                item = images[i]
                if isinstance(item, MediaItem) and tuple(p.grid_thw) != self.engine.inputs.grid(item):
                    raise RequestFailed("the media did not match their plan", Role.ENCODE)
            t0 = time.perf_counter()
            try:
                fresh = self.loop.encode(request_id, processed)
            except WorkerUnavailable:
                raise
            except Exception as exc:  # noqa: BLE001 - this request's images failed, alone
                raise RequestFailed("the images could not be encoded", Role.ENCODE) from exc
            run_s = time.perf_counter() - t0

            def remember() -> None:
                for i, emb in zip(missing, fresh, strict=True):
                    self.cache.put(keys[i], emb)

            self.loop.call(remember)
            for i, emb in zip(missing, fresh, strict=True):
                found[i] = emb
        inputs = self.engine.inputs
        items = [(inputs.grid(im), im.video if isinstance(im, MediaItem) else im.ndim == 4) for im in images]
        rows, kept = self.engine.prune(found, items, keep)
        return torch.cat(rows), kept, run_s

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
        self: Any, request_id: str, ref: EmbeddingRef, timings: StageTimings
    ) -> torch.Tensor:
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

        def read_and_free() -> torch.Tensor:
            out = self.embeddings.read(slots, ref.num_tokens)
            self.embeddings.free(slots)
            self.ledger.update(request_id, lambda e: e.slot_lists.remove(slots))
            return out

        return self.loop.call(read_and_free)
