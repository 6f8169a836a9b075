"""Online gRPC gateway in front of Triton. Never imports torch or the modelling package."""
