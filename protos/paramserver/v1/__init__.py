"""The contract, paramserver.v1: the .proto, its generated stubs (``python protos/generate.py``),
``wire`` and ``unwire`` (the hand codec of the data plane's hot messages: encoding, decoding) and
``tcp`` (the TCP data plane's framing). Everything that talks to a paramserver, in any language,
follows these."""

ERROR_TRAILER = "paramserver-error-bin"
"""gRPC trailing metadata key of a refusal's serialized ``ErrorInfo`` (the proto's header comment)."""
