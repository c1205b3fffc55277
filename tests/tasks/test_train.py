"""Training: learns, resumes after a kill, fails clearly on NaN, copes with empty documents, buckets by length.

The numpy-only product of experts is tested in tests/tasks/model/test_expert_product.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage.artifacts import ArtifactRef, ArtifactStore
from storage.checkpoints import CheckpointDir
from storage.errors import InputFormatError, PipelineError, TrainingDiverged
from tasks.config import PipelineConfig, TrainConfig, with_preset
from tests.tasks._training_data import publish_inputs, synthetic_sequences, tiny_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run trained through the task wrapper (shared by the read-only tests below)."""
    from tasks.train import train

    home = str(tmp_path_factory.mktemp("home"))
    tokens, embeddings, documents = publish_inputs(home)
    cfg = tiny_config()
    ref = train.fn(cfg, tokens, embeddings, data_home=home)
    return home, cfg, tokens, embeddings, ref, documents


# -- the task ----------------------------------------------------------------------------------------
def test_run_holds_everything_needed_to_classify_and_learns(trained):
    from tasks.model import load_model, predict_proba
    from tasks.train import split_sequences

    home, cfg, tokens, embeddings, ref, _ = trained
    store = ArtifactStore(home)
    run_dir = store.local_dir(ref)
    for name in ("model.keras", "history.parquet", "curves.png", "labels.json", "vocab.parquet", "tokenizer.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run_dir / "labels.json").read_text()) == ["comp.graphics", "rec.sport.hockey", "sci.space", "talk.politics"]
    history = pq.read_table(run_dir / "history.parquet").to_pylist()
    assert [row["epoch"] for row in history] == [1, 2]
    assert all(np.isfinite(row["loss"]) and np.isfinite(row["val_loss"]) for row in history)

    manifest = store.read_manifest(ref)
    assert manifest["backend"] == "tensorflow" and manifest["device"] == "cpu"
    assert manifest["training"]["validation"] == "latest" and manifest["training"]["experts"] == ["lstm", "bow"]
    assert manifest["training"]["epochs_run"] == 2 and manifest["training"]["resumed_from_epoch"] == 0
    assert manifest["upstream"] == [{"step": t.step, "key": t.key, "uri": t.uri} for t in (tokens, embeddings)]
    assert not (Path(home) / "train" / f".work-{ref.key}").exists(), "checkpoints are discarded once published"

    # Accuracy on the held-out test split, far above chance (0.25).
    table = pq.read_table(store.local_dir(tokens) / "sequences.parquet")
    test = table.filter(np.asarray(table["split"].to_pylist()) == "test")
    probs = predict_proba(load_model(run_dir / "model.keras"), split_sequences(test), 40)
    accuracy = float((probs.argmax(1) == np.asarray(test["label"].to_pylist())).mean())
    assert accuracy > 0.8, accuracy
    assert np.allclose(probs.sum(1), 1.0, atol=1e-4)


def test_second_call_is_a_store_hit(trained):
    from tasks.train import train

    home, cfg, tokens, embeddings, ref, _ = trained
    before = ArtifactStore(home).read_manifest(ref)["created"]
    assert train.fn(cfg, tokens, embeddings, data_home=home) == ref
    assert ArtifactStore(home).read_manifest(ref)["created"] == before


def test_run_key_follows_training_params_and_inputs_not_the_deployment():
    from tasks.train import STEP

    def run_key(cfg, tokens, matrix):
        return STEP.key(cfg, [tokens, matrix])

    tokens = ArtifactRef(step="tokens", key="t1", uri="/x/tokens/t1")
    matrix = ArtifactRef(step="embeddings", key="e1", uri="/x/embeddings/e1")
    other = ArtifactRef(step="embeddings", key="e2", uri="/x/embeddings/e2")
    cfg = TrainConfig()
    assert run_key(cfg, tokens, matrix) == run_key(TrainConfig(), tokens, matrix)
    assert run_key(cfg, tokens, matrix) != run_key(cfg.model_copy(update={"epochs": 3}), tokens, matrix)
    assert run_key(cfg, tokens, matrix) != run_key(cfg, tokens, other)
    assert "deployment" not in TrainConfig.model_fields  # where training runs is a flow parameter, not a training setting


def test_presets():
    seed = with_preset(PipelineConfig(), "seed")
    assert (seed.tokenize.num_words, seed.tokenize.max_length) == (20_000, 1000)
    assert seed.train.preset == "seed" and seed.train.architecture == "lstm_last" and seed.train.lstm_units == 100
    assert seed.train.unfreeze_embeddings_after is None and (seed.train.epochs, seed.train.batch_size) == (5, 32)
    assert not seed.train.bow_expert and not seed.train.swem_expert and seed.train.lstm_stride == 1  # one word per step
    default = with_preset(seed, "default")
    assert default.train == TrainConfig() and default.tokenize.num_words == PipelineConfig().tokenize.num_words
    with pytest.raises(ValueError, match="unknown preset"):
        with_preset(PipelineConfig(), "fastest")


# -- resume after a kill -------------------------------------------------------------------------------
KILL_AFTER_FIRST_EPOCH = textwrap.dedent(
    """
    import json, os, signal, sys
    from storage.artifacts import ArtifactRef
    from tasks.config import TrainConfig
    from tasks.model import training
    from tasks.train import train

    save = training.EpochCheckpoint._save
    def save_then_die(self, epoch, improved, stopped):
        save(self, epoch, improved, stopped)
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handlers: like the OOM killer
    training.EpochCheckpoint._save = save_then_die
    args = json.loads(sys.argv[1])
    train.fn(TrainConfig(**args["cfg"]), ArtifactRef(**args["tokens"]), ArtifactRef(**args["embeddings"]), data_home=args["home"])
    """
)


def test_killed_training_resumes_from_its_last_finished_epoch(home):
    from tasks.train import STEP, train

    tokens, embeddings, _ = publish_inputs(home, seed=1)
    cfg = tiny_config(epochs=3)
    args = {"cfg": cfg.model_dump(mode="json"), "tokens": tokens.model_dump(), "embeddings": embeddings.model_dump(), "home": home}
    child = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_EPOCH, json.dumps(args)], cwd=REPO,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
                           capture_output=True, text=True, timeout=240)
    assert child.returncode == -9, child.stderr[-2000:]
    store = ArtifactStore(home)
    key = STEP.key(cfg, [tokens, embeddings])
    assert store.find("train", key) is None, "a killed training publishes nothing"
    assert [p.name for p in sorted(store.work_dir("train", key).glob("ckpt-*"))] == ["ckpt-0001"]

    ref = train.fn(cfg, tokens, embeddings, data_home=home)
    training = store.read_manifest(ref)["training"]
    assert training["resumed_from_epoch"] == 1, "epoch 1 must not be trained again"
    assert training["epochs_run"] == 3
    history = pq.read_table(store.local_dir(ref) / "history.parquet").to_pylist()
    assert [row["epoch"] for row in history] == [1, 2, 3]


def test_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    from tasks.model import fit_classifier

    sequences, labels, matrix = synthetic_sequences()
    cfg = tiny_config(epochs=2)
    _, _, first = fit_classifier(cfg, sequences, labels, matrix, 3, 30, CheckpointDir(tmp_path))
    assert first["epochs_run"] == 2
    (tmp_path / "ckpt-0002" / "state.weights.h5").write_bytes(b"torn")  # e.g. a disk-full write
    _, history, again = fit_classifier(cfg.model_copy(update={"epochs": 3}), sequences, labels, matrix, 3, 30, CheckpointDir(tmp_path))
    assert again["resumed_from_epoch"] == 1
    assert [row["epoch"] for row in history] == [1, 2, 3]


def test_refit_trains_on_every_document_for_the_best_epoch_count_and_resumes(tmp_path):
    from keras import ops

    from tasks.model import fit_classifier, predict_proba

    sequences, labels, matrix = synthetic_sequences(n=90)
    cfg = tiny_config(epochs=3, refit=True)
    classifier, history, summary = fit_classifier(cfg, sequences, labels, matrix, 3, 30, CheckpointDir(tmp_path))
    best = summary["best_epoch"]
    assert summary["train_documents"] < 90 and summary["refit"]["documents"] == 90
    assert summary["refit"]["epochs"] == best and summary["refit"]["resumed_from_epoch"] == 0
    np.testing.assert_allclose(ops.convert_to_numpy(classifier.get_layer("expert_product").expert_weights),
                               history[best - 1]["expert_weights"], rtol=1e-5)  # fitted on the validation slice
    assert list((tmp_path / "refit").glob("ckpt-*")), "the refit checkpoints its epochs"
    # Run again on the same checkpoints (a retried task): nothing is trained twice, the same model comes back.
    again, _, summary2 = fit_classifier(cfg, sequences, labels, matrix, 3, 30, CheckpointDir(tmp_path))
    assert summary2["refit"]["resumed_from_epoch"] == best and summary2["resumed_from_epoch"] == len(history)
    np.testing.assert_allclose(predict_proba(again, sequences[:8], 30), predict_proba(classifier, sequences[:8], 30), atol=1e-5)


def test_refit_members_are_other_seeds_averaged_expert_by_expert_and_saved_as_one_model(tmp_path):
    from tasks.model import expert_probabilities, fit_classifier, load_model, predict_proba
    from tasks.model.expert_product import product_probabilities

    sequences, labels, matrix = synthetic_sequences(n=90)
    cfg = tiny_config(epochs=2, refit=True, refit_members=2)
    classifier, history, summary = fit_classifier(cfg, sequences, labels, matrix, 3, 30, CheckpointDir(tmp_path / "ckpt"))
    assert summary["refit"]["members"] == 2
    assert list((tmp_path / "ckpt" / "refit").glob("ckpt-*")) and list((tmp_path / "ckpt" / "refit-2").glob("ckpt-*"))
    first, second = (predict_proba(classifier.get_layer(f"member_{i}"), sequences, 30) for i in (1, 2))
    assert first.shape == (90, 2, 3) and not np.allclose(first, second, atol=1e-3), "the members have their own seeds"
    mean = np.exp((np.log(np.clip(first, 1e-7, 1)) + np.log(np.clip(second, 1e-7, 1))) / 2)
    experts = expert_probabilities(classifier, sequences, 30)
    np.testing.assert_allclose(experts, mean / mean.sum(-1, keepdims=True), atol=1e-5)  # normalised geometric mean
    weights = history[summary["best_epoch"] - 1]["expert_weights"]
    np.testing.assert_allclose(predict_proba(classifier, sequences, 30), product_probabilities(experts, np.asarray(weights)),
                               atol=1e-5)
    classifier.save(tmp_path / "model.keras")
    np.testing.assert_allclose(predict_proba(load_model(tmp_path / "model.keras"), sequences, 30),
                               predict_proba(classifier, sequences, 30), atol=1e-6)


# -- failures -----------------------------------------------------------------------------------------
def test_nan_loss_fails_with_training_diverged_and_keeps_no_checkpoint(tmp_path, monkeypatch):
    from tasks.model import training

    sequences, labels, matrix = synthetic_sequences()
    matrix[1:] = np.nan  # what a corrupt vectors file would give
    monkeypatch.setattr(training, "check_inputs", lambda *a: None)  # get past the up-front check to the training guard
    with pytest.raises(training.TrainingDiverged, match="lower learning_rate"):
        training.fit_classifier(tiny_config(), sequences, labels, matrix, 3, 30, CheckpointDir(tmp_path))
    assert not list(tmp_path.glob("ckpt-*")), "no checkpoint (and no best weights) from a diverged epoch"


def test_nan_embedding_matrix_through_the_task_is_rejected_before_training(home):
    from tasks.train import train

    tokens, embeddings, _ = publish_inputs(home, seed=2, nan_row=True)
    with pytest.raises(InputFormatError, match="NaN"):
        train.fn(tiny_config(), tokens, embeddings, data_home=home)


def test_matrix_that_does_not_match_the_vocabulary_is_rejected_before_building(tmp_path):
    from tasks.model import ModelInputError, fit_classifier

    sequences, labels, matrix = synthetic_sequences(vocab=30)
    with pytest.raises(ModelInputError, match="rows"):
        fit_classifier(tiny_config(), sequences, labels, matrix[:10], 3, 30, CheckpointDir(tmp_path))


# -- empty documents, padding and bucketing -------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["lstm_pool", "bilstm_pool", "lstm_last"])
def test_batches_holding_empty_documents_train_without_nan(tmp_path, architecture):
    from tasks.model import fit_classifier, pad_batch, predict_proba

    sequences, labels, matrix = synthetic_sequences(n=60, empty=20)  # a third of the documents are empty
    ids, lengths = pad_batch([sequences[0], sequences[25]], 30)
    assert lengths[0] == 1 and ids[0, 0] == 0, "an empty document becomes one padding step, never a fully-masked row"
    cfg = tiny_config(architecture=architecture, batch_size=64, epochs=1)  # one batch holds all of them
    classifier, history, _ = fit_classifier(cfg, sequences, labels, matrix, 3, 30, CheckpointDir(tmp_path))
    assert np.isfinite(history[0]["loss"]) and np.isfinite(history[0]["val_loss"])
    probs = predict_proba(classifier, [np.zeros(0, np.int32), sequences[30]], 30)
    assert np.all(np.isfinite(probs)) and np.allclose(probs.sum(1), 1.0, atol=1e-4)


def test_predictions_do_not_depend_on_the_padding_of_the_batch(tmp_path):
    """Right padding + reversal within length + masked pooling: padding never leaks into a document."""
    from tasks.model import fit_classifier, predict_proba

    sequences, labels, matrix = synthetic_sequences(n=60)
    classifier, _, _ = fit_classifier(tiny_config(epochs=1), sequences, labels, matrix, 3, 30, CheckpointDir(tmp_path))
    short, long_ = sequences[3][:4], np.arange(1, 29, dtype=np.int32)
    alone = predict_proba(classifier, [short], 30)
    padded = predict_proba(classifier, [short, long_], 30)  # one batch, padded to 28 steps
    np.testing.assert_allclose(alone[0], padded[0], rtol=1e-4, atol=1e-6)


def test_bucketing_pads_each_batch_only_to_its_longest_document():
    from tasks.model import BucketedBatches

    rng = np.random.default_rng(0)
    sequences = [np.arange(1, n + 1, dtype=np.int32) for n in rng.integers(0, 300, size=500)]
    data = BucketedBatches(sequences, np.zeros(500), batch_size=32, max_length=200, seed=7)
    seen = []
    for i in range(len(data)):
        x, y = data[i]
        rows = data.batches[i]
        longest = max(1, min(200, max(len(sequences[r]) for r in rows)))
        assert x["ids"].shape == (len(rows), longest), "no batch is wider than its longest document"
        assert y.shape == (len(rows), 1)
        seen.extend(rows)
    assert sorted(seen) == list(range(500)), "every document exactly once per epoch"
    cells = sum(data[i][0]["ids"].size for i in range(len(data)))
    tokens = sum(max(1, min(len(s), 200)) for s in sequences)
    assert cells < 1.1 * tokens < 0.8 * 500 * 200, "padding stays within 10% of the tokens; not padded to max_length"

    first = [b.tolist() for b in data.batches]
    data.set_epoch(1)
    assert [b.tolist() for b in data.batches] != first, "reshuffled every epoch"
    data.set_epoch(0)
    assert [b.tolist() for b in data.batches] == first, "seeded: the same epoch gets the same batches"

    rounded = BucketedBatches(sequences, np.zeros(500), batch_size=32, max_length=200, seed=7, multiple=32)
    for i in range(len(rounded)):
        width = rounded[i][0]["ids"].shape[1]
        longest = max(1, min(200, max(len(sequences[r]) for r in rounded.batches[i])))
        assert longest <= width < longest + 32 and (width % 32 == 0 or width == 200)


def test_device_batches_serve_the_same_batches_from_tensors_uploaded_a_piece_at_a_time():
    """DeviceBatches (used under torch and jax) give BucketedBatches' batches of the kept rows, epoch after epoch,
    built from Rows a piece at a time (pieces of different widths); here on the CPU."""
    from keras import ops

    from tasks.model import BucketedBatches, Rows
    from tasks.model.device_batches import DeviceBatches, validation_batches

    rng = np.random.default_rng(1)
    sequences = [np.arange(1, n + 1, dtype=np.int32) for n in rng.integers(0, 90, size=150)]
    labels = rng.integers(0, 4, size=150)
    rows, keep = Rows.in_memory(sequences, labels, chunk_rows=40), rng.random(150) < 0.8
    kept = np.flatnonzero(keep)
    host = BucketedBatches([sequences[i] for i in kept], labels[kept], batch_size=16, max_length=60, seed=3, multiple=8,
                           targets=2)
    device = DeviceBatches(((seqs, rows.labels[numbers]) for numbers, seqs in rows.select(keep)), batch_size=16,
                           max_length=60, seed=3, multiple=8, targets=2)
    for epoch in (0, 1, 0):
        host.set_epoch(epoch)
        device.set_epoch(epoch)
        assert len(device) == len(host)
        for i in range(len(host)):
            (x, y), (dx, dy) = host[i], device[i]
            np.testing.assert_array_equal(ops.convert_to_numpy(dx["ids"]), x["ids"])
            np.testing.assert_array_equal(ops.convert_to_numpy(dx["lengths"]), x["lengths"])
            np.testing.assert_array_equal(ops.convert_to_numpy(dy), y)
    unlabelled = DeviceBatches([(sequences, None)], batch_size=40, max_length=60, multiple=32)
    assert np.array_equal(ops.convert_to_numpy(unlabelled[0]["ids"]), BucketedBatches(
        sequences, batch_size=40, max_length=60, multiple=32)[0]["ids"])
    assert validation_batches(rows, keep, 60) is None  # TensorFlow: the validation slice stays streamed


def test_no_training_callback_makes_a_step_wait_for_the_device():
    """A callback with a batch-end hook makes Keras hand every step's logs to the host before the next step,
    unless it is async_safe (torch and jax then run it off the training loop)."""
    from keras.src import backend
    from keras.src.callbacks.callback_list import CallbackList
    from keras.src.utils.python_utils import is_default

    from tasks.model import callbacks
    from tasks.model.refit import RefitCheckpoint

    classes = [getattr(callbacks, name) for name in dir(callbacks) if isinstance(getattr(callbacks, name), type)
               and getattr(callbacks, name).__module__ == callbacks.__name__] + [RefitCheckpoint]
    assert {c.__name__ for c in classes} >= {"StopWhenAsked", "BatchProgress", "EpochCheckpoint", "ExpertWeightsFit"}
    for callback in classes:
        for hook in ("on_batch_end", "on_train_batch_end", "on_train_batch_begin", "on_batch_begin"):
            assert is_default(getattr(callback, hook)) or (getattr(callback, "async_safe", False) and "end" in hook), \
                f"{callback.__name__}.{hook}"
    # Keras' own rule, as the torch and jax backends apply it: the batch-end hooks of these two do not block.
    hooked = CallbackList([callbacks.StopWhenAsked(lambda: False, "ckpt"), callbacks.BatchProgress(print, 1, 1)])
    assert hooked._async_train == backend.IS_THREAD_SAFE  # False under TensorFlow, which calls every hook in line


def test_latest_validation_slice_holds_each_groups_latest_posts():
    from tasks.model import validation_split
    from tasks.train import posting_order

    labels = np.array([0] * 5 + [1] * 5)
    order = posting_order([f"train/a/{n}" for n in (5, 1, 90, 30, 700)] + [f"train/b/{n}" for n in (20, 400, 10, 3000, 50)])
    train, val = validation_split(labels, 0.4, seed=0, mode="latest", order=order)
    assert val.tolist() == [2, 4, 6, 8] and train.tolist() == [0, 1, 3, 5, 7, 9]  # the two highest article numbers each
    assert validation_split(labels, 0.4, seed=5, mode="latest", order=order)[1].tolist() == val.tolist()  # seed-free
    assert validation_split(labels, 0.4, 0, "latest")[1].tolist() == [3, 4, 8, 9]  # no order: the last rows
    randoms = {tuple(validation_split(labels, 0.4, seed, "random")[1]) for seed in range(6)}
    assert len(randoms) > 1 and all(sum(r < 5 for r in v) == 2 for v in randoms)  # seeded, still stratified
    # File names that are not article numbers rank in natural order.
    assert posting_order(["train/g/a10", "train/g/a2", "train/g/b1", "train/g/a2x"]).tolist() == [2, 0, 3, 1]


def test_expert_cross_entropy_smooths_only_the_experts_it_is_asked_to():
    import keras

    from tasks.model.model import expert_cross_entropy

    y = np.array([[1, 1], [3, 3]])
    p = np.random.default_rng(0).dirichlet(np.ones(4), size=(2, 2)).astype("float32")  # (batch, experts, classes)
    plain = np.asarray(keras.losses.sparse_categorical_crossentropy(y, p)).mean(axis=-1)
    np.testing.assert_allclose(np.asarray(expert_cross_entropy([0.0, 0.0])(y, p)), plain, rtol=1e-5)
    target = np.eye(4)[y[:, 0]] * 0.8 + 0.2 / 4  # the first expert's smoothed targets; the second's stay one-hot
    by_hand = (-(target * np.log(p[:, 0])).sum(-1) - np.log(p[np.arange(2), 1, y[:, 1]])) / 2
    np.testing.assert_allclose(np.asarray(expert_cross_entropy([0.2, 0.0])(y, p)), by_hand, rtol=1e-5)


def test_reverse_within_length_and_last_step():
    from tasks.model import LastValidStep, ReverseWithinLength

    x = np.arange(1, 6, dtype=np.float32)[None, :, None].repeat(3, axis=0)  # rows 1..5
    lengths = np.array([3, 1, 5], dtype=np.int32)
    reversed_ = np.asarray(ReverseWithinLength()([x, lengths]))[:, :, 0]
    np.testing.assert_array_equal(reversed_, [[3, 2, 1, 4, 5], [1, 2, 3, 4, 5], [5, 4, 3, 2, 1]])
    last = np.asarray(LastValidStep()([x, lengths]))[:, 0]
    np.testing.assert_array_equal(last, [3, 1, 5])


def test_merge_steps_concatenates_word_pairs_within_each_length():
    from tasks.model import MergeSteps

    x = np.arange(1, 6, dtype=np.float32)[None, :, None].repeat(3, axis=0)  # rows 1..5, one feature
    merged, lengths = MergeSteps(2)([x, np.array([3, 0, 5], dtype=np.int32)])
    np.testing.assert_array_equal(np.asarray(merged)[:, :, :], [
        [[1, 2], [3, 0], [0, 0]],  # length 3: two steps, the padding after it is zeroed, not merged in
        [[1, 0], [0, 0], [0, 0]],  # an empty document keeps one step
        [[1, 2], [3, 4], [5, 0]],  # odd width: padded to a whole pair
    ])
    np.testing.assert_array_equal(np.asarray(lengths), [2, 1, 3])


def test_bag_of_words_weighs_terms_by_sublinear_tf_idf():
    """Per occurrence (1 + ln tf) / tf * idf, so each word counts (1 + ln tf) * idf, over the tf-idf vector's norm."""
    from tasks.model import BagOfWordsScores, term_counts

    ids = np.array([[5, 3, 5, 5, 0, 7], [2, 2, 9, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=np.int32)
    lengths = np.array([4, 3, 0], dtype=np.int32)
    np.testing.assert_array_equal(np.asarray(term_counts(ids, lengths))[:2, :4], [[3, 1, 3, 3], [2, 2, 1, 3]])

    layer = BagOfWordsScores(10, 2, scale=1.0)
    layer.build(None)
    idf = np.linspace(1.0, 2.0, 10).astype(np.float32)
    idf[0] = 0.0
    scores = np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32)
    layer.idf.assign(idf)
    layer.scores.assign(scores)
    out = np.asarray(layer([ids, lengths]))
    for row, words in enumerate([{5: 3, 3: 1}, {2: 2, 9: 1}]):  # position 5 of row 0 lies past its length
        tfidf = {w: (1 + np.log(tf)) * idf[w] for w, tf in words.items()}
        norm = np.sqrt(sum(v * v for v in tfidf.values()))
        np.testing.assert_allclose(out[row], sum(v * scores[w] for w, v in tfidf.items()) / norm, rtol=1e-4)
    np.testing.assert_allclose(out[2], 0.0, atol=1e-6)  # an empty document scores nothing


# -- other backends --------------------------------------------------------------------------------------
BACKEND_SMOKE = textwrap.dedent(
    """
    import sys, tempfile
    import numpy as np
    from storage.checkpoints import CheckpointDir
    from tasks.model import fit_classifier, load_model, predict_proba
    from tests.tasks._training_data import synthetic_sequences, tiny_config
    sequences, labels, matrix = synthetic_sequences(n=60, empty=5)
    with tempfile.TemporaryDirectory() as tmp:
        classifier, history, summary = fit_classifier(tiny_config(), sequences, labels, matrix, 3, 30, CheckpointDir(tmp))
        assert summary["backend"] == sys.argv[1], summary
        assert all(np.isfinite(h["loss"]) for h in history)
        probs = predict_proba(classifier, sequences[:10], 30)
        classifier.save(tmp + "/model.keras")
        again = predict_proba(load_model(tmp + "/model.keras"), sequences[:10], 30)
        np.testing.assert_allclose(probs, again, atol=1e-5)
    print("ok")
    """
)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_same_code_trains_on_other_backends(backend):
    pytest.importorskip(backend)
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    child = subprocess.run([sys.executable, "-c", BACKEND_SMOKE, backend], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=280)
    assert child.returncode == 0 and "ok" in child.stdout, child.stderr[-3000:]


def test_out_of_memory_is_reported_as_a_batch_size_problem(tmp_path, monkeypatch):
    import keras

    from tasks.model import OutOfDeviceMemory, fit_classifier

    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(keras.Model, "fit", oom)
    sequences, labels, matrix = synthetic_sequences()
    with pytest.raises(OutOfDeviceMemory, match="batch_size=16"):
        fit_classifier(tiny_config(), sequences, labels, matrix, 3, 30, CheckpointDir(tmp_path))


@pytest.mark.parametrize("raised, expected", [
    ("ModelInputError", InputFormatError), ("TrainingDiverged", TrainingDiverged), ("OutOfDeviceMemory", PipelineError),
])
def test_the_task_turns_the_models_errors_into_the_pipelines(home, monkeypatch, raised, expected):
    import tasks.model
    from tasks.train import train

    def fail(*args, **kwargs):
        raise getattr(tasks.model, raised)(f"{raised} message")

    monkeypatch.setattr(tasks.model, "fit_classifier", fail)
    tokens, embeddings, _ = publish_inputs(home, seed=3)
    with pytest.raises(expected, match=f"^{raised} message$") as failure:
        train.fn(tiny_config(), tokens, embeddings, data_home=home)
    assert isinstance(failure.value.__cause__, tasks.model.ModelError)
