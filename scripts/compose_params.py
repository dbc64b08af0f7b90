"""Write params.yaml from conf/pipeline.yaml, as DVC's Hydra composition does on `dvc exp run`.

`dvc repro` reads the committed params.yaml; tests/unit/test_config.py fails when it drifts
from what Hydra composes from conf/.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from k2repro.config.load import compose_dict

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "params.yaml")
    out.write_text(yaml.safe_dump(compose_dict(sys.argv[2:], "pipeline"), sort_keys=False))
    print(f"wrote {out}")
