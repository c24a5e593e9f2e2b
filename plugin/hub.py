"""The Hugging Face hub as a source of models and datasets, failing fast when it cannot be reached.

huggingface_hub retries an unreachable hub for about half a minute and then reports a missing file
("does not appear to have a file named model_index.json"), which reads like a wrong name. One short probe
first turns that into an immediate, true message. Names already in the local cache need no probe.
"""

from __future__ import annotations

import urllib.error
import urllib.request

from huggingface_hub import constants

from .errors import ConfigError

PROBE_SECONDS = 5.0


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """One HEAD request to the hub endpoint (proxies from the environment apply). Any HTTP answer, even an
    error status, means the hub is there."""
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # URLError, timeouts, refused connections, a malformed HF_ENDPOINT
        return False
    return True


def require_hub(field: str, name: str, local_example: str) -> None:
    """A ConfigError naming `field` when `name` (not a local folder, not cached) would need an unreachable hub."""
    if constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
    elif not hub_reachable():
        reason = f"the Hugging Face hub ({constants.ENDPOINT}) could not be reached (offline?) and it is not in the local cache"
    else:
        return
    raise ConfigError(
        f"{field}: {name!r} is not a local folder, and {reason}; download it once where the hub is reachable, "
        f"or set {field} to a local folder (e.g. {local_example})"
    )
