"""Where the project's shared/ facts live for the tests: beside the clone (as CI has it) or $DYNRECON_SHARED."""
import os
from pathlib import Path


def shared_dir(sub: str) -> Path:
    """The shared/ folder; fails loudly (never skips) when ``shared/<sub>`` is absent."""
    env = os.environ.get('DYNRECON_SHARED')
    path = Path(env) if env else Path(__file__).resolve().parents[2] / 'shared'
    if not (path / sub).is_dir():
        raise FileNotFoundError(f'shared/{sub} not found under {path} (set DYNRECON_SHARED)')
    return path
