"""Fine-tuning after quantization (docs/METHODS.md §10): learnable quantization parameters that start
from any qflow IR and end as one again, a shared training loop, and the block-wise reconstruction driver."""
