"""The classifier: Keras 3 experts model, length-bucketed batches, resumable training loop.

Pure and backend-neutral (numpy + keras.ops, no tf.*): it imports neither Prefect nor the artifact
store, so the same code trains under KERAS_BACKEND=tensorflow, jax or torch on a machine that has
only keras + numpy. Its errors are its own (tasks.model.errors); tasks/train.py maps them to the
pipeline's.

    layers.py          the custom Keras layers (registered: saved models load with keras.saving.load_model)
    model.py           build_model, compile_model, load_model, predict_proba
    expert_product.py  numpy only: the product of experts' probabilities and the fit of its expert weights
    batches.py         padding, length buckets, Rows (documents a piece at a time), the PyDatasets
    device_batches.py  DeviceBatches: batches uploaded once to the accelerator (torch, jax), where they fit
    training.py        fit_classifier (and refit.py: the second training on every document)
    callbacks.py       the training loop's Keras callbacks
    errors.py          ModelError and its subclasses

Importing this package imports no Keras: the names below are loaded from their module on first use
(`from tasks.model import fit_classifier` imports Keras, `tasks.model.expert_product` does not).
"""

from __future__ import annotations

import importlib
import sys

_EXPORTS = {
    "fit_classifier": "training",
    "device_info": "training",
    "validation_split": "training",
    "build_model": "model",
    "check_inputs": "model",
    "compile_model": "model",
    "expert_names": "model",
    "expert_probabilities": "model",
    "load_model": "model",
    "predict_proba": "model",
    "BagOfWordsScores": "layers",
    "ExpertProduct": "layers",
    "FirstSteps": "layers",
    "GatedEmbedding": "layers",
    "LastValidStep": "layers",
    "MaskedAttentionPool": "layers",
    "MaskedMaxMeanPool": "layers",
    "MergeSteps": "layers",
    "ReverseWithinLength": "layers",
    "inverse_document_frequency": "layers",
    "term_counts": "layers",
    "BucketedBatches": "batches",
    "Rows": "batches",
    "StreamedBatches": "batches",
    "bucket_batches": "batches",
    "length_multiple": "batches",
    "pad_batch": "batches",
    "fit_expert_weights": "expert_product",
    "log_loss": "expert_product",
    "product_probabilities": "expert_product",
    "ModelError": "errors",
    "ModelInputError": "errors",
    "OutOfDeviceMemory": "errors",
    "TrainingDiverged": "errors",
    "TrainingInterrupted": "errors",
}
__all__ = tuple(sorted(_EXPORTS))


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = f"{__name__}.{_EXPORTS[name]}"
    if "keras" in sys.modules or module.endswith((".expert_product", ".errors")):
        value = getattr(importlib.import_module(module), name)
    else:  # the first Keras import loads TensorFlow, whose C++ start-up log ignores TF_CPP_MIN_LOG_LEVEL
        from tasks.model.native_log import native_stderr_filtered

        with native_stderr_filtered():
            value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})
