"""One process of tests/test_train_lora_distributed.py: `scripts/train_lora.py` with 4 CPU devices.

    python tests/train_lora_worker.py LOCAL_DEVICES -- TRAIN_LORA_ARGS...
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))

if __name__ == "__main__":
    from multiprocess import cpu_worker_environment

    cpu_worker_environment(int(sys.argv[1]))
    import train_lora

    sys.exit(train_lora.main(sys.argv[sys.argv.index("--") + 1:]))
