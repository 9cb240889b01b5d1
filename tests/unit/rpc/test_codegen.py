"""The committed gRPC code (`serving/rpc/proto/`) is what `protos/epd/v1/*.proto` generate: this fails
when a .proto changed and `python -m serving.rpc.codegen` (`make protos`) was not run."""

from __future__ import annotations

from serving.rpc import codegen


def test_generated_code_is_up_to_date():
    fresh = codegen.generate()
    committed = {p.name: p.read_text() for p in codegen.OUT.iterdir() if p.is_file()}
    assert set(fresh) == set(committed), "files differ: run `make protos`"
    stale = [name for name, text in fresh.items() if committed[name] != text]
    assert not stale, f"stale generated code {stale}: run `make protos`"


def test_the_generated_modules_import_inside_the_package():
    from serving.rpc.proto import admin_pb2_grpc, generate_pb2_grpc

    assert generate_pb2_grpc.GenerationStub and admin_pb2_grpc.AdminStub
    assert "from epd.v1" not in (codegen.OUT / "generate_pb2_grpc.py").read_text()
