"""Reading and writing communication profiles (JSON). The only file I/O of the cost layer.

File format (schema version 1), as written by ``emulator calibrate``::

    {"schema_version": 1, "name": "host-a",
     "entries": [{"op": "all_reduce", "group_size": 4, "placement": "intra",
                  "alpha_s": 3.1e-05, "beta_s_per_byte": 1.2e-09, "gamma_s_per_byte": 0.0},
                 ...],
     "host": {"num_ranks": 2, "step_gap_s": 0.0011, "step_fixed_s": 6e-05, ...}}

``host`` (the emulator host's per-step overheads, see ``comm.HostOverhead``) is optional:
profiles from hardware specs, and files written before it existed, have none.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import ValidationError

from emulator.atomic import write_json_atomic
from emulator.cost.comm import PROFILE_SCHEMA_VERSION, CommProfile, ProfileError


def _field_path(loc: tuple) -> str:
    """('entries', 3, 'alpha_s') -> 'entries[3].alpha_s'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def load_profile(path: str | os.PathLike) -> CommProfile:
    """Read and validate a profile; bad input raises ProfileError naming the file and field."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"{path}: communication profile not found; run `emulator "
                           f"calibrate` to create one or omit it to use hardware specs") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"{path}: not a readable JSON communication profile ({exc})") from None
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: a communication profile is a JSON object with "
                           f"'schema_version', 'name' and 'entries'")
    if "schema_version" not in raw:
        raise ProfileError(f"{path}: field 'schema_version' is missing; a profile file starts "
                           f"with {{\"schema_version\": {PROFILE_SCHEMA_VERSION}, ...}}")
    if raw["schema_version"] != PROFILE_SCHEMA_VERSION:
        raise ProfileError(f"{path}: field 'schema_version': version {raw['schema_version']!r} "
                           f"is not supported; this code reads version {PROFILE_SCHEMA_VERSION} "
                           f"(re-run `emulator calibrate`)")
    try:
        return CommProfile.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ProfileError(f"{path}: field '{_field_path(err['loc'])}': {err['msg']}") from None


def save_profile(profile: CommProfile, path: str | os.PathLike) -> None:
    """Write ``profile`` as JSON atomically (temporary file, then rename)."""
    write_json_atomic(path, profile.model_dump(mode="json"))
