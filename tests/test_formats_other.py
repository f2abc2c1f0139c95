"""Readers for npz, ONNX, Keras, Flax msgpack and Orbax against files written by the real frameworks.

Every value is compared with the writer's own in-memory arrays and, where the framework has a loader, with what
that loader returns. Writers that are not installed skip their tests (CI installs only the reading extras).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ilr_inspect.errors import CorruptCheckpointError, InputError, MissingExtraError
from ilr_inspect.formats import OpenOptions, flax_msgpack, keras, npz, onnx_file, orbax

OPTS = OpenOptions()


def _read_all(ckpt: Any) -> dict[str, np.ndarray]:
    return {name: np.asarray(arr) for name, arr in ckpt.iter_arrays()}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Writers' own deprecation chatter must not fail the suite (filterwarnings = error)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------------------------------------- npz

def test_npz_names_shapes_values_and_laziness(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {
        "conv/kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
        "bn/moving_mean": rng.normal(size=4),
        "steps": np.arange(5, dtype=np.int64),
    }
    p = tmp_path / "w.npz"
    np.savez(p, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
    assert npz.sniff(p)
    with npz.open(p, OPTS) as ck:
        assert list(ck.tensors) == list(arrays)
        for name, a in arrays.items():
            info = ck.tensors[name]
            assert info.shape == a.shape and info.dtype == str(a.dtype)
            np.testing.assert_array_equal(ck.read(name), a)
        assert ck.tensors["bn/moving_mean"].kind == "buffer"
        assert ck.tensors["conv/kernel"].kind == "parameter"
        assert ck.step is None


def test_npz_refuses_object_arrays(tmp_path: Path) -> None:
    p = tmp_path / "obj.npz"
    np.savez(p, ok=np.ones(3), bad=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match=r"'bad'.*pickle"):
        npz.open(p, OPTS)


def test_npz_truncated_is_corrupt(tmp_path: Path) -> None:
    p = tmp_path / "t.npz"
    np.savez(p, a=np.ones(1000))
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(CorruptCheckpointError):
        npz.open(p, OPTS)


# ------------------------------------------------------------------------------------------------------- ONNX

@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    d = tmp_path_factory.mktemp("onnx")

    class Net(torch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, bias=False)
            self.bn = torch.nn.BatchNorm2d(4)
            self.fc = torch.nn.Linear(4 * 6 * 6, 5)

        def forward(self, x: Any) -> Any:
            return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        net.train()
        net(torch.randn(16, 3, 8, 8) * 3 + 1)
        net.bn.weight.uniform_(0.5, 2.0)
        net.bn.bias.normal_()
    x = torch.randn(2, 3, 8, 8)
    out: dict[str, Any] = {"eps": net.bn.eps}
    with _quiet():
        # BN kept: the TorchScript exporter in training mode without constant folding.
        torch.onnx.export(net, (x,), str(d / "train.onnx"), dynamo=False,
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
        out["train"] = d / "train.onnx"
        # Tracing in training mode runs one forward pass, which updates the BN running statistics: snapshot after.
        out["state"] = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
        net.eval()
        try:
            import onnxscript  # noqa: F401  (the default dynamo exporter needs it)

            torch.onnx.export(net, (x,), str(d / "default.onnx"), verbose=False)
            out["default"] = d / "default.onnx"
        except ImportError:
            pass
    return out


def test_onnx_training_export_keeps_bn(onnx_files: dict[str, Any]) -> None:
    p = onnx_files["train"]
    state = onnx_files["state"]
    assert onnx_file.sniff(p)
    with onnx_file.open(p, OPTS) as ck:
        got = _read_all(ck)
        expected = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        assert set(got) == set(expected)
        for k, v in expected.items():
            np.testing.assert_array_equal(got[k], v)
            assert ck.tensors[k].shape == v.shape
        assert {n for n, t in ck.tensors.items() if t.kind == "buffer"} == {"bn.running_mean", "bn.running_var"}
        assert ck.metadata["has_normalizers"] is True
        assert ck.metadata["normalizers"] == {"BatchNormalization": 1}
        assert ck.metadata["warnings"] == []
    graph = onnx_file.load_graph(p)
    assert [n.op_type for n in graph.graph.node].count("BatchNormalization") == 1


def test_onnx_default_export_folds_bn_and_warns(onnx_files: dict[str, Any]) -> None:
    if "default" not in onnx_files:
        pytest.skip("onnxscript (torch's default ONNX exporter) is not installed")
    p = onnx_files["default"]
    state = onnx_files["state"]
    with onnx_file.open(p, OPTS) as ck:
        assert ck.metadata["has_normalizers"] is False
        assert len(ck.metadata["warnings"]) == 1 and "folds BatchNorm" in ck.metadata["warnings"][0]
        # The trap itself: same name as the checkpoint's conv weight, but the values are conv ∘ BN folded.
        folded = ck.read("conv.weight").astype(np.float64)
        scale = state["bn.weight"].astype(np.float64) / np.sqrt(state["bn.running_var"].astype(np.float64)
                                                                 + onnx_files["eps"])
        np.testing.assert_allclose(folded, state["conv.weight"] * scale[:, None, None, None], rtol=1e-5, atol=1e-6)
        assert not np.allclose(folded, state["conv.weight"])
        np.testing.assert_array_equal(ck.read("fc.weight"), state["fc.weight"])


def test_onnx_external_data_is_read_lazily_and_confined(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    init = numpy_helper.from_array(w, "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [init])
    model = helper.make_model(graph)
    p = tmp_path / "ext.onnx"
    onnx.save_model(model, str(p), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.bin",
                    size_threshold=0)
    with onnx_file.open(p, OPTS) as ck:
        assert ck.metadata["warnings"] == [] and ck.metadata["has_normalizers"] is False
        np.testing.assert_array_equal(ck.read("w"), w)
        np.testing.assert_array_equal(ck.read("w"), w)  # reading twice must not depend on a mutated proto
    (tmp_path / "ext.bin").unlink()
    with pytest.raises(CorruptCheckpointError, match="missing"):
        onnx_file.open(p, OPTS)
    # A location escaping the model's folder is refused before anything is read.
    m = onnx.load(str(p), load_external_data=False)
    for entry in m.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../outside.bin"
    bad = tmp_path / "sub" / "bad.onnx"
    bad.parent.mkdir()
    onnx.save_model(m, str(bad))
    (tmp_path / "outside.bin").write_bytes(w.tobytes())
    with pytest.raises(InputError, match="outside the model's folder"):
        onnx_file.open(bad, OPTS)


def test_onnx_garbage_is_corrupt(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    p = tmp_path / "g.onnx"
    p.write_bytes(b"\xff\xfe not a protobuf" * 10)
    with pytest.raises(CorruptCheckpointError):
        onnx_file.open(p, OPTS)


# ------------------------------------------------------------------------------------------------------- Keras

@pytest.fixture(scope="module")
def keras_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("h5py")
    with _quiet():
        # Keras fixes its backend at import; torch is a core dependency. Leave the environment as we found it.
        previous = os.environ.get("KERAS_BACKEND")
        os.environ.setdefault("KERAS_BACKEND", "torch")
        try:
            k = pytest.importorskip("keras")
        finally:
            if previous is None:
                os.environ.pop("KERAS_BACKEND", None)
        d = tmp_path_factory.mktemp("keras")
        rng = np.random.default_rng(0)
        k.utils.set_random_seed(0)

        # 1) Conv + BN + Dense, SGD with momentum and weight decay, a ModelCheckpoint series during fit.
        inp = k.Input((8, 8, 3))
        h = k.layers.Conv2D(4, 3, name="conv")(inp)
        h = k.layers.BatchNormalization()(h)
        h = k.layers.ReLU()(h)
        h = k.layers.Flatten()(h)
        m1 = k.Model(inp, k.layers.Dense(5)(h))
        m1.compile(optimizer=k.optimizers.SGD(0.05, momentum=0.9, weight_decay=1e-3),
                   loss=k.losses.SparseCategoricalCrossentropy(from_logits=True))
        xs = rng.normal(size=(32, 8, 8, 3)).astype("float32")
        ys = rng.integers(0, 5, 32)
        series = d / "series"
        m1.fit(xs, ys, epochs=2, batch_size=8, verbose=0,
               callbacks=[k.callbacks.ModelCheckpoint(str(series / "e{epoch:02d}.keras"))])
        m1.save(d / "m1.keras")
        m1.save_weights(d / "m1.weights.h5")

        # 2) Nested model, attention sublayers, BN without center, Dense without bias, a frozen layer, AdamW.
        block = k.Sequential([k.layers.Dense(6, use_bias=False), k.layers.BatchNormalization(center=False),
                              k.layers.LayerNormalization()], name="block")
        inp2 = k.Input((5,), dtype="int32")
        h = k.layers.Embedding(10, 4)(inp2)
        h = k.layers.MultiHeadAttention(2, 3)(h, h)
        h = block(k.layers.Flatten()(h))
        frozen = k.layers.Dense(3, name="frozen_head")
        frozen.trainable = False
        m2 = k.Model(inp2, k.layers.Dense(3)(frozen(h)))
        m2.compile(optimizer=k.optimizers.AdamW(1e-3, weight_decay=0.02, beta_2=0.99), loss="mse")
        m2.fit(rng.integers(0, 10, (8, 5)), rng.normal(size=(8, 3)), epochs=1, batch_size=4, verbose=0)
        m2.save(d / "m2.keras")
        m2.save_weights(d / "m2.weights.h5")

        # 3) Mixed-precision style: a LossScaleOptimizer wrapping Adam (its own counters stay at 0).
        m3 = k.Sequential([k.Input((6, 2)), k.layers.SeparableConv1D(2, 3, padding="same"), k.layers.Flatten(),
                           k.layers.Dense(3)])
        m3.compile(optimizer=k.optimizers.LossScaleOptimizer(k.optimizers.Adam(0.01, weight_decay=0.1)), loss="mse")
        m3.fit(rng.normal(size=(12, 6, 2)), rng.normal(size=(12, 3)), batch_size=4, verbose=0)
        m3.save(d / "m3.keras")

        # 4) bfloat16 weights: Keras writes 2-byte opaque data plus a dtype attribute.
        m4 = k.Sequential([k.Input((4,)), k.layers.Dense(3, dtype="bfloat16", name="half")])
        m4.save_weights(d / "bf16.weights.h5")

        def snapshot(m: Any) -> dict[str, Any]:
            # The reader names variables by their chain of layer names below the model, which is Keras'
            # Variable.path for Functional models; Sequential ones build their layers under the model's own name.
            def path(v: Any) -> str:
                return str(v.path).removeprefix(f"{m.name}/")

            return {
                "values": {path(v): np.asarray(v.numpy()) for v in m.weights},
                "trainable": {path(v) for v in m.trainable_weights},
                "buffers": {path(v) for v in m.non_trainable_weights},
                "iterations": int(np.asarray(m.optimizer.iterations)),
            }

        out: dict[str, Any] = {"dir": d, "m1": snapshot(m1), "m2": snapshot(m2), "m3": snapshot(m3),
                               "series": series, "steps_per_epoch": 4}
        out["bf16"] = {str(v.path).removeprefix(f"{m4.name}/"): k.ops.convert_to_numpy(k.ops.cast(v.value, "float32"))
                       for v in m4.weights}
        out["m1_loaded"] = {v.path: np.asarray(v.numpy())
                            for v in k.saving.load_model(d / "m1.keras").weights}
        # Keras' weight-decay semantics, measured: a zero gradient with SGD(lr, weight_decay) scales w by 1 - lr·wd.
        v = k.Variable(np.ones(3, dtype="float32"))
        opt = k.optimizers.SGD(0.1, weight_decay=0.5)
        opt.apply_gradients([(k.ops.zeros(3), v)])
        out["wd_probe"] = np.asarray(v.numpy())
        return out


def test_keras_archive_matches_model(keras_files: dict[str, Any]) -> None:
    snap = keras_files["m1"]
    p = keras_files["dir"] / "m1.keras"
    assert keras.sniff(p)
    with keras.open(p, OPTS) as ck:
        got = _read_all(ck)
        assert list(got) == list(snap["values"])  # config.json gives model order
        for name, val in snap["values"].items():
            np.testing.assert_array_equal(got[name], val)
            np.testing.assert_array_equal(got[name], keras_files["m1_loaded"][name])
        assert {n for n, t in ck.tensors.items() if t.kind == "buffer"} == snap["buffers"]
        assert "batch_normalization/moving_mean" in snap["buffers"]
        assert ck.step == snap["iterations"] == 8 and ck.step_source == "contents"
        assert ck.metadata["roles"] == "config.json"
        assert set(ck.hparams) == snap["trainable"]
        hp = ck.hparams["conv/kernel"]
        assert hp.lr == pytest.approx(0.05) and hp.weight_decay == pytest.approx(1e-3)
        assert hp.momentum == pytest.approx(0.9) and hp.optimizer == "SGD" and not hp.nesterov
        assert hp.wd_mode == "decoupled" and hp.source == "keras:compile_config" == ck.hparams_source


def test_keras_recompressed_and_truncated_archives(keras_files: dict[str, Any], tmp_path: Path) -> None:
    import zipfile

    src = keras_files["dir"] / "m1.keras"
    deflated = tmp_path / "deflated.keras"  # Keras stores members; a re-zipped archive compresses them
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    with keras.open(deflated, OPTS) as ck:
        got = _read_all(ck)
        for name, val in keras_files["m1"]["values"].items():
            np.testing.assert_array_equal(got[name], val)
    for cut in (100, src.stat().st_size // 2):
        broken = tmp_path / f"cut{cut}.keras"
        broken.write_bytes(src.read_bytes()[:cut])
        with pytest.raises(CorruptCheckpointError):
            keras.open(broken, OPTS)
    h5 = tmp_path / "cut.weights.h5"
    h5.write_bytes((keras_files["dir"] / "m1.weights.h5").read_bytes()[:3000])
    with pytest.raises(CorruptCheckpointError):
        keras.open(h5, OPTS)


def test_keras_weight_decay_is_decoupled_and_lr_scaled(keras_files: dict[str, Any]) -> None:
    # The reader labels Keras wd "decoupled"; this is what Keras itself does to w with a zero gradient.
    np.testing.assert_allclose(keras_files["wd_probe"], np.full(3, 1 - 0.1 * 0.5), rtol=1e-6)


def test_keras_bare_weights_file(keras_files: dict[str, Any]) -> None:
    snap = keras_files["m1"]
    p = keras_files["dir"] / "m1.weights.h5"
    assert keras.sniff(p)
    with keras.open(p, OPTS) as ck:
        got = _read_all(ck)
        assert set(got) == set(snap["values"])
        for name, val in snap["values"].items():
            np.testing.assert_array_equal(got[name], val)
        assert {n for n, t in ck.tensors.items() if t.kind == "buffer"} == snap["buffers"]
        assert "inferred" in ck.metadata["roles"]
        assert ck.step == snap["iterations"]
        # lr from the file's own optimizer variables; momentum / weight decay from the run's m1.keras beside it.
        hp = ck.hparams["dense/kernel"]
        assert hp.lr == pytest.approx(0.05) and hp.source == "keras:optimizer_state+keras:compile_config(m1.keras)"
        assert (hp.weight_decay, hp.momentum, hp.wd_mode) == (pytest.approx(1e-3), pytest.approx(0.9), "decoupled")


def test_keras_nested_model_and_frozen_layer(keras_files: dict[str, Any]) -> None:
    snap = keras_files["m2"]
    with keras.open(keras_files["dir"] / "m2.keras", OPTS) as ck:
        got = _read_all(ck)
        assert set(got) == set(snap["values"])
        for name, val in snap["values"].items():
            np.testing.assert_array_equal(got[name], val)
        # Keras numbers layer names globally (batch_normalization_1 …): take the block's BN name from the model.
        bn_gamma = next(n for n in snap["values"] if n.startswith("block/batch_norm") and n.endswith("/gamma"))
        assert "multi_head_attention/query/kernel" in got and bn_gamma in got
        # Keras' own split: the frozen head's weights are non-trainable, like BN statistics, and get no hparams.
        assert {n for n, t in ck.tensors.items() if t.kind == "buffer"} == snap["buffers"]
        assert set(ck.hparams) == snap["trainable"] == set(ck.parameters)
        assert ck.metadata["frozen"] == ["frozen_head/kernel", "frozen_head/bias"]
        hp = ck.hparams["embedding/embeddings"]
        assert (hp.optimizer, hp.lr, hp.weight_decay, hp.momentum, hp.beta2) == pytest.approx(
            ("AdamW", 1e-3, 0.02, 0.9, 0.99))
        assert ck.step == snap["iterations"] == 2
    # Without config.json, BN without center stores one affine vector that cannot be named: it keeps its index.
    with keras.open(keras_files["dir"] / "m2.weights.h5", OPTS) as ck:
        got = _read_all(ck)
        renamed = {bn_gamma: bn_gamma.replace("/gamma", "/0")}
        assert set(got) == {renamed.get(n, n) for n in snap["values"]}
        for name, val in snap["values"].items():
            np.testing.assert_array_equal(got[renamed.get(name, name)], val)
        assert ck.tensors[bn_gamma.replace("/gamma", "/moving_variance")].kind == "buffer"


def test_keras_loss_scale_optimizer_reads_the_inner_one(keras_files: dict[str, Any]) -> None:
    snap = keras_files["m3"]
    with keras.open(keras_files["dir"] / "m3.keras", OPTS) as ck:
        got = _read_all(ck)
        assert list(got) == list(snap["values"])  # includes separable_conv1d/{depthwise,pointwise}_kernel, bias
        for name, val in snap["values"].items():
            np.testing.assert_array_equal(got[name], val)
        assert ck.step == 3 == snap["iterations"] and ck.metadata["wrapped_by"] == "LossScaleOptimizer"
        assert set(ck.hparams) == snap["trainable"]
        hp = ck.hparams[next(iter(snap["trainable"]))]
        assert (hp.optimizer, hp.lr, hp.weight_decay, hp.momentum) == pytest.approx(("Adam", 0.01, 0.1, 0.9))


def test_keras_bfloat16_weights_widen_to_float32(keras_files: dict[str, Any]) -> None:
    with keras.open(keras_files["dir"] / "bf16.weights.h5", OPTS) as ck:
        assert {n: t.dtype for n, t in ck.tensors.items()} == {"half/kernel": "bfloat16", "half/bias": "bfloat16"}
        for name, val in keras_files["bf16"].items():
            got = ck.read(name)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, val)
        assert not np.all(keras_files["bf16"]["half/kernel"] == 0)


def test_keras_modelcheckpoint_series_steps(keras_files: dict[str, Any]) -> None:
    files = sorted(keras_files["series"].glob("*.keras"))
    assert [f.name for f in files] == ["e01.keras", "e02.keras"]
    steps = []
    for f in files:
        with keras.open(f, OPTS) as ck:
            steps.append((ck.step, ck.step_source))
    spe = keras_files["steps_per_epoch"]
    assert steps == [(spe, "contents"), (2 * spe, "contents")]


def test_keras_rejects_foreign_hdf5(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f:
        f["data"] = np.ones(3)
    assert keras.sniff(p)  # the cheap sniff only sees an HDF5 file named .h5
    with pytest.raises(InputError, match="not Keras weights"):
        keras.open(p, OPTS)


def test_keras2_legacy_h5(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    kernel = np.arange(6, dtype=np.float32).reshape(2, 3)
    mean = np.ones(3, dtype=np.float32)
    p = tmp_path / "legacy.h5"
    with h5py.File(p, "w") as f:  # the layout tf.keras 2 save_weights wrote
        f.attrs["layer_names"] = [b"dense", b"bn"]
        g = f.create_group("dense")
        g.attrs["weight_names"] = [b"dense/kernel:0"]
        g["dense/kernel:0"] = kernel
        g = f.create_group("bn")
        g.attrs["weight_names"] = [b"bn/moving_mean:0"]
        g["bn/moving_mean:0"] = mean
    with keras.open(p, OPTS) as ck:
        assert ck.metadata["layout"] == "keras2-h5"
        np.testing.assert_array_equal(ck.read("dense/kernel"), kernel)
        np.testing.assert_array_equal(ck.read("bn/moving_mean"), mean)
        assert ck.tensors["bn/moving_mean"].kind == "buffer"


# ------------------------------------------------------------------------------------------------------- Flax

@pytest.fixture(scope="module")
def flax_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("msgpack")
    with _quiet():
        jax = pytest.importorskip("jax")
        nn = pytest.importorskip("flax.linen")
        serialization = pytest.importorskip("flax.serialization")
        optax = pytest.importorskip("optax")
        jnp = jax.numpy
        d = tmp_path_factory.mktemp("flax")

        class Net(nn.Module):  # type: ignore[misc,name-defined]
            @nn.compact  # type: ignore[untyped-decorator]
            def __call__(self, x: Any, train: bool = True) -> Any:
                x = nn.Conv(4, (3, 3))(x)
                x = nn.BatchNorm(use_running_average=not train)(x)
                return nn.Dense(3)(nn.relu(x).reshape(x.shape[0], -1))

        x = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 6, 3))
        variables = Net().init(jax.random.PRNGKey(0), x)
        _, updates = Net().apply(variables, x * 2 + 1, mutable=["batch_stats"])  # non-trivial running stats
        variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
        (d / "flax_model.msgpack").write_bytes(serialization.to_bytes(variables))
        tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
        opt_state = tx.init(variables["params"])
        state = {"step": 7, "params": variables["params"], "batch_stats": variables["batch_stats"],
                 "opt_state": opt_state}
        (d / "state.msgpack").write_bytes(serialization.to_bytes(state))
        big = {"w": jnp.arange(40, dtype=jnp.float32).reshape(4, 10), "h": jnp.linspace(-3, 3, 7).astype(jnp.bfloat16)}
        old = serialization.MAX_CHUNK_SIZE
        serialization.MAX_CHUNK_SIZE = 64  # force Flax's chunked-array encoding for a small array
        try:
            (d / "chunked.msgpack").write_bytes(serialization.msgpack_serialize(big))
        finally:
            serialization.MAX_CHUNK_SIZE = old
        return {"dir": d, "variables": jax.tree_util.tree_map(np.asarray, variables), "serialization": serialization,
                "opt_state": serialization.to_state_dict(opt_state),
                "big": {k: np.asarray(v.astype(jnp.float32)) for k, v in big.items()}}


def _flat(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    if isinstance(tree, dict):
        out: dict[str, np.ndarray] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    return {prefix: np.asarray(tree)}


def test_flax_msgpack_matches_variables_and_from_bytes(flax_files: dict[str, Any]) -> None:
    p = flax_files["dir"] / "flax_model.msgpack"
    expected = _flat(flax_files["variables"])
    restored = _flat(flax_files["serialization"].from_bytes(flax_files["variables"], p.read_bytes()))
    assert flax_msgpack.sniff(p)
    with flax_msgpack.open(p, OPTS) as ck:
        got = _read_all(ck)
        assert set(got) == set(expected) and "params/Conv_0/kernel" in got
        for name, val in expected.items():
            np.testing.assert_array_equal(got[name], val)
            np.testing.assert_array_equal(got[name], restored[name])
            assert ck.tensors[name].shape == val.shape and ck.tensors[name].dtype == str(val.dtype)
        assert {n for n, t in ck.tensors.items() if t.kind == "buffer"} == {
            "batch_stats/BatchNorm_0/mean", "batch_stats/BatchNorm_0/var"}
        assert ck.step is None
    assert not np.allclose(expected["batch_stats/BatchNorm_0/mean"], 0)


def test_flax_train_state_step_and_optimizer_excluded(flax_files: dict[str, Any]) -> None:
    with flax_msgpack.open(flax_files["dir"] / "state.msgpack", OPTS) as ck:
        assert ck.step == 7 and ck.step_source == "contents"
        assert not any(n.startswith("opt_state") for n in ck.tensors)
        params = {n for n in _flat(flax_files["variables"]) if n.startswith("params/")}
        assert set(ck.parameters) == params
        opt_leaves = _flat(flax_files["opt_state"])
        assert ck.metadata["optimizer_tensors"] == len(opt_leaves) == len(params) + 3  # traces, count, 2 hparams
        # optax.inject_hyperparams stores lr and momentum in the state; they apply to every parameter.
        assert set(ck.hparams) == params and ck.hparams_source == "optax:inject_hyperparams"
        hp = ck.hparams["params/Conv_0/kernel"]
        assert hp.lr == pytest.approx(float(opt_leaves["hyperparams/learning_rate"])) == pytest.approx(0.1)
        assert hp.momentum == pytest.approx(0.9) and hp.weight_decay is None and hp.lr_timing == "used"


def test_flax_chunked_and_bfloat16(flax_files: dict[str, Any]) -> None:
    with flax_msgpack.open(flax_files["dir"] / "chunked.msgpack", OPTS) as ck:
        assert ck.tensors["w"].shape == (4, 10)
        np.testing.assert_array_equal(ck.read("w"), flax_files["big"]["w"])
        assert ck.tensors["h"].dtype == "bfloat16"
        out = ck.read("h")
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, flax_files["big"]["h"])


def test_flax_truncated_is_corrupt(flax_files: dict[str, Any], tmp_path: Path) -> None:
    p = tmp_path / "t.msgpack"
    p.write_bytes((flax_files["dir"] / "flax_model.msgpack").read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError):
        flax_msgpack.open(p, OPTS)


# ------------------------------------------------------------------------------------------------------- Orbax

@pytest.fixture(scope="module")
def orbax_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("tensorstore")
    with _quiet():
        pytest.importorskip("jax")
        ocp = pytest.importorskip("orbax.checkpoint")
        root = tmp_path_factory.mktemp("orbax") / "ckpts"
        rng = np.random.default_rng(0)
        trees = {}
        mngr = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(max_to_keep=5))
        for step in (100, 200, 300):
            tree = {
                "step": step,
                "params": {"Conv_0": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
                                      "bias": rng.normal(size=4).astype(np.float32)},
                           "BatchNorm_0": {"scale": rng.normal(size=4).astype(np.float32)}},
                "batch_stats": {"BatchNorm_0": {"mean": rng.normal(size=4).astype(np.float32)}},
                "opt_state": {"mu": {"Conv_0": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)}},
                              "hyperparams": {"learning_rate": np.asarray(1e-3 * step, dtype=np.float32)}},
            }
            mngr.save(step, args=ocp.args.StandardSave(tree))
            trees[step] = tree
        mngr.wait_until_finished()
        restored = {s: mngr.restore(s, args=ocp.args.StandardRestore(trees[s])) for s in trees}
        mngr.close()
        # A checkpoint without OCDBT: one zarr directory per array.
        plain = root.parent / "plain"
        ocp.PyTreeCheckpointer(use_ocdbt=False).save(plain / "item_5", {"params": {"w": np.arange(6.0).reshape(2, 3)}})
        return {"root": root, "trees": trees, "restored": restored, "plain": plain / "item_5"}


def test_orbax_sniff_step_folders_not_root(orbax_run: dict[str, Any]) -> None:
    root = orbax_run["root"]
    assert not orbax.sniff(root)
    assert sorted(p.name for p in root.iterdir() if orbax.sniff(p)) == ["100", "200", "300"]
    assert orbax.sniff(root / "100" / "default")


def test_orbax_steps_match_saved_and_restored(orbax_run: dict[str, Any]) -> None:
    for step, tree in orbax_run["trees"].items():
        expected = {k: v for k, v in _flat(tree).items() if not k.startswith("opt_state") and k != "step"}
        restored = _flat(orbax_run["restored"][step])
        with orbax.open(orbax_run["root"] / str(step), OPTS) as ck:
            assert ck.step == step and ck.step_source == "contents"  # folder name, confirmed by the stored step
            got = _read_all(ck)
            assert set(got) == set(expected)
            for name, val in expected.items():
                np.testing.assert_array_equal(got[name], val)
                np.testing.assert_array_equal(got[name], restored[name])
                assert ck.tensors[name].shape == val.shape and ck.tensors[name].dtype == "float32"
            assert ck.tensors["batch_stats/BatchNorm_0/mean"].kind == "buffer"
            assert set(ck.parameters) == {n for n in expected if n.startswith("params/")}
            assert ck.metadata["optimizer_tensors"] == 2
            lr = float(tree["opt_state"]["hyperparams"]["learning_rate"])
            assert set(ck.hparams) == set(ck.parameters) and ck.hparams["params/Conv_0/bias"].lr == lr


def test_orbax_step_from_name_when_not_stored(orbax_run: dict[str, Any], tmp_path: Path) -> None:
    with orbax.open(orbax_run["plain"], OPTS) as ck:
        assert ck.step == 5 and ck.step_source == "name" and ck.metadata["step_from"] == "folder name"
        np.testing.assert_array_equal(ck.read("params/w"), np.arange(6.0).reshape(2, 3))


def test_orbax_damaged_step_folders(orbax_run: dict[str, Any], tmp_path: Path) -> None:
    gone = tmp_path / "100"
    shutil.copytree(orbax_run["root"] / "100", gone)
    for data in (gone / "default").rglob("d/*"):
        data.unlink()
    with pytest.raises(CorruptCheckpointError), orbax.open(gone, OPTS) as ck:
        _read_all(ck)
    garbled = tmp_path / "200"
    shutil.copytree(orbax_run["root"] / "200", garbled)
    (garbled / "default" / "_METADATA").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="_METADATA"):
        orbax.open(garbled, OPTS)


def test_orbax_refuses_paths_outside_the_checkpoint(orbax_run: dict[str, Any], tmp_path: Path) -> None:
    item = tmp_path / "evil_1"
    shutil.copytree(orbax_run["plain"], item)
    meta = json.loads((item / "_METADATA").read_text())
    entry = next(iter(meta["tree_metadata"].values()))
    entry["key_metadata"] = [{"key": str(tmp_path / "secret"), "key_type": 2}]
    (item / "_METADATA").write_text(json.dumps({**meta, "tree_metadata": {"x": entry}}))
    with pytest.raises(InputError, match="outside the checkpoint folder"):
        orbax.open(item, OPTS)


# ------------------------------------------------------------------------------------------------------- extras

@pytest.mark.parametrize(("module", "missing", "extra", "make"), [
    (keras, "h5py", "keras", "h5"),
    (onnx_file, "onnx", "onnx", "onnx"),
    (flax_msgpack, "msgpack", "jax", "msgpack"),
    (orbax, "tensorstore", "jax", "orbax"),
])
def test_missing_extra_names_it(module: Any, missing: str, extra: str, make: str, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    p = {"h5": tmp_path / "x.weights.h5", "onnx": tmp_path / "x.onnx", "msgpack": tmp_path / "x.msgpack",
         "orbax": tmp_path / "1"}[make]
    if make == "orbax":
        (p / "default").mkdir(parents=True)
        (p / "default" / "_METADATA").write_text("{}")
    else:
        p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64 if make == "h5" else b"\x80")
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import missing` raise ImportError
    with pytest.raises(MissingExtraError) as err:
        module.open(p, OPTS)
    assert err.value.hint == f"pip install 'ilr-inspect[{extra}]'"
    assert missing in err.value.message


def test_sniffs_are_exclusive_and_import_no_framework(tmp_path: Path) -> None:
    h5 = tmp_path / "m.weights.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 8)
    kz = tmp_path / "m.keras"
    kz.write_bytes(b"PK\x03\x04" + b"\0" * 8)
    nz = tmp_path / "a.npz"
    nz.write_bytes(b"PK\x03\x04" + b"\0" * 8)
    mp = tmp_path / "flax_model.msgpack"
    mp.write_bytes(b"\x81\xa1a\xc0")
    ox = tmp_path / "m.onnx"
    ox.write_bytes(b"\x08\x07")
    step = tmp_path / "ckpts" / "10"
    step.mkdir(parents=True)
    (step / "_CHECKPOINT_METADATA").write_text("{}")
    files = {"keras": [h5, kz], "npz": [nz], "flax": [mp], "onnx": [ox], "orbax": [step]}
    code = f"""
import sys
from pathlib import Path
from ilr_inspect.formats import npz, onnx_file, keras, flax_msgpack, orbax
mods = {{"keras": keras, "npz": npz, "flax": flax_msgpack, "onnx": onnx_file, "orbax": orbax}}
files = {{k: [Path(p) for p in v] for k, v in {json.dumps({k: [str(p) for p in v] for k, v in files.items()})}.items()}}
for owner, paths in files.items():
    for p in paths:
        hits = [name for name, m in mods.items() if m.sniff(p)]
        assert hits == [owner], (p, hits)
assert not orbax.sniff(Path({str(tmp_path / "ckpts")!r}))
heavy = {{"torch", "jax", "keras", "onnx", "h5py", "tensorstore", "msgpack", "flax", "tensorflow"}}
assert not heavy & set(sys.modules), heavy & set(sys.modules)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr



def test_readers_need_only_the_reading_extras(request: pytest.FixtureRequest) -> None:
    """With every writer framework unimportable, the readers still open and read the real files."""
    targets: list[tuple[str, str]] = []
    for fixture, module, key in [("keras_files", "keras", "m1.keras"), ("flax_files", "flax_msgpack", "state.msgpack"),
                                 ("orbax_run", "orbax", "100"), ("onnx_files", "onnx_file", "train")]:
        try:
            files = request.getfixturevalue(fixture)
        except pytest.skip.Exception:
            continue
        base = files.get("dir", files.get("root"))
        targets.append((module, str(files[key] if key in files else base / key)))
    if not targets:
        pytest.skip("no writer framework installed")
    code = f"""
import sys
for m in ("torch", "jax", "jaxlib", "flax", "keras", "orbax", "optax", "tensorflow"):
    sys.modules[m] = None  # any import of these now fails
from pathlib import Path
import importlib
from ilr_inspect.formats import OpenOptions
for module, path in {targets!r}:
    mod = importlib.import_module("ilr_inspect.formats." + module)
    with mod.open(Path(path), OpenOptions()) as ck:
        assert ck.tensors and all(ck.read(n).shape == t.shape for n, t in ck.tensors.items()), path
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]


def test_registry_detects_each_format(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The shared registry, with every other reader ahead in sniff order, hands each file to its own reader."""
    from ilr_inspect.formats import detect

    np.savez(tmp_path / "w.npz", a=np.ones(2))
    cases: list[tuple[Path, str]] = [(tmp_path / "w.npz", npz.NAME)]
    for fixture, keys, name in [("keras_files", ["m1.keras", "m1.weights.h5"], keras.NAME),
                                ("flax_files", ["flax_model.msgpack"], flax_msgpack.NAME),
                                ("orbax_run", ["100"], orbax.NAME), ("onnx_files", ["train"], onnx_file.NAME)]:
        try:
            files = request.getfixturevalue(fixture)
        except pytest.skip.Exception:
            continue
        base = files.get("dir", files.get("root"))
        cases += [(files[k] if k in files else base / k, name) for k in keys]
        if fixture == "orbax_run":
            cases.append((files["plain"], name))
    assert [(p.name, detect(p).NAME) for p, _ in cases] == [(p.name, n) for p, n in cases]
