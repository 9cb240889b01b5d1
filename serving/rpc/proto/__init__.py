"""Generated gRPC code for protos/epd/v1 (see serving/rpc/codegen.py)."""
