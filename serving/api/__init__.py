"""The serving API with no transport in it: typed requests, validation, media, admission, the run of a
request's choices through the pipeline, metrics and SLO accounting. The OpenAI HTTP routes
(`serving/gateway/`) and the gRPC servicers (`serving/rpc/`) are thin adapters over it."""
