"""paramserver, the client SDK: what every Python program that talks to a paramserver uses.

    from paramserver import errors
    from paramserver.client import PsClient

``client`` (``PsClient``, the async facade: control calls, pushes, pulls), ``errors`` (the typed
error tree), ``security`` (TLS settings and the token), ``streams`` / ``sink`` / the transports
(gRPC, the TCP data plane), and the settings and
runtime helpers the programs share (importing this package loads none of them: the server's
core imports ``settings`` without gRPC or the stubs). The contract, ``paramserver.v1``, lives in
``protos/paramserver/v1`` in the source tree and is installed beside these modules.
"""

import os as _os

# In a source checkout the contract is not a subfolder of this one: look for it there too.
_contract = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "protos", "paramserver")
if _os.path.isdir(_os.path.join(_contract, "v1")) and _contract not in __path__:
    __path__.append(_contract)

