"""The pipeline stages as plain, typed functions (the Prefect @task layer lives in flows/stages.py)."""

import logging

# Importing transformers imports peft and so bitsandbytes, which on CPUs with AVX512-BF16 warns that its optional
# hub kernel (the `kernels` package) is missing and then falls back to its bundled one. adaptflow's 4-bit layers
# use neither (adapters_impl.qlora routes CPU inference through the dequantizing path training uses), so for
# adaptflow the line is noise: dropped here, before anything imports transformers. This is the one thing importing
# adaptflow does (start-up is flows/startup.py): a process-pool trial worker or a Dask worker imports `tasks` while
# unpickling its task, before any start-up code of ours could run, and bitsandbytes logs the line at import.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
)
