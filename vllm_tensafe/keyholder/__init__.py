"""The key holder: the one party that holds CKKS secret keys, and the host's way to it.

Modules, one job each:

* ``wire``    protocol v2: ``AdapterRef`` (who asks for what), the request and reply codec
* ``local``   ``KeyHolder`` (what the host's delta engine talks to) and ``LocalKeyHolder``
              (decrypt, flood, modulus switch: in the host process, or inside the service)
* ``remote``  ``RemoteKeyHolder``, the host's client of the service, and the start-up check
* ``server``  ``vllm-tensafe key-holder serve``: policy, tokens, revocation, audit, HTTP, TLS

Names are exported lazily: importing this package loads neither TenSEAL nor FastAPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_tensafe._lazy import lazy_exports

if TYPE_CHECKING:
    from vllm_tensafe.keyholder.local import KeyHolder, LocalKeyHolder
    from vllm_tensafe.keyholder.remote import RemoteKeyHolder
    from vllm_tensafe.keyholder.server.server import KeyHolderService
    from vllm_tensafe.keyholder.wire import AdapterRef
    from vllm_tensafe.settings import TenSafeSettings

__all__ = [
    "AdapterRef",
    "KeyHolder",
    "KeyHolderService",
    "LocalKeyHolder",
    "RemoteKeyHolder",
    "key_holder_from_settings",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "AdapterRef": "wire",
        "KeyHolder": "local",
        "LocalKeyHolder": "local",
        "RemoteKeyHolder": "remote",
        "KeyHolderService": "server.server",
    },
    globals(),
)


def key_holder_from_settings(settings: TenSafeSettings) -> KeyHolder:
    """The key holder the settings describe; never falls back to another kind."""
    from vllm_tensafe.errors import ConfigError

    if settings.key_holder == "local":
        if settings.he_secret is None:
            raise ConfigError(
                "key_holder is 'local' but no secret key file is set",
                "set --tensafe-he-secret / TENSAFE_HE_SECRET to PREFIX.secret",
            )
        from vllm_tensafe.he.keys import SecretKeySet
        from vllm_tensafe.keyholder.local import LocalKeyHolder

        secret = SecretKeySet.load(settings.he_secret, settings.he_secret_passphrase)
        return LocalKeyHolder(secret)
    if settings.key_holder == "remote":
        from vllm_tensafe.keyholder.remote import RemoteKeyHolder

        return RemoteKeyHolder.from_settings(settings)
    raise ConfigError(f"unknown key holder kind {settings.key_holder!r}", "use 'local' or 'remote'")
