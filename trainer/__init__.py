"""CamVid U-Net training: model, losses, metrics, visualisation and the distributed loop.

Importing the package turns on TensorFlow's oneDNN CPU kernels unless TF_ENABLE_ONEDNN_OPTS is
already set. TensorFlow enables them by default only on CPUs with AVX-512; on an AVX2-only CPU
(the 2-core CI VM) they train the `small` preset 1.35x faster (benchmarks/bench_trainer.py,
docs/benchmarks.md). TensorFlow reads the variable once, when it is first imported, which is why this
lives here: every entry point (`python -m trainer.task`, tuning, benchmarks) imports the trainer
package before TensorFlow. GPU kernels are unaffected.
"""

import os

os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '1')
