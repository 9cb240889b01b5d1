"""The gRPC API (`protos/epd/v1/`): servicers over the service layer and the control plane, health per
role, reflection. `server.py` starts it beside the HTTP routes in the gateway process."""
