"""``python -m vllm_tensafe.cli``: the ``vllm-tensafe`` command."""

import sys

from vllm_tensafe.cli import main

sys.exit(main())
