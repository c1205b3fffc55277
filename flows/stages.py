"""The pipeline's stages and steps, named once (no Prefect import: the CLI reads them to build its parser)."""

STAGES = ("data", "tokens", "embeddings", "train", "evaluate")  # --until: stop after this stage
STAGE_OF_STEP = {"download": "data", "corpus": "data", "glove": "data", "tokens": "tokens", "embeddings": "embeddings",
                 "train": "train", "evaluate": "evaluate", "sweep": "evaluate"}
STEP_ORDER = ("download-glove", "download-corpus", "corpus", "glove", "tokens", "embeddings", "train", "evaluate", "sweep")
