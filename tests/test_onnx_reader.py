"""Tests for normalcy.backbones.onnx_reader, on ONNX models encoded by a tiny protobuf writer.

Weights are decoded from their stored bytes, not computed, so they are compared exactly."""

from __future__ import annotations

import numpy as np
import pytest

from normalcy.backbones.onnx_reader import OnnxNode, parse_onnx

# --- a minimal protobuf encoder ------------------------------------------------------------------

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5
FLOAT, INT64, FLOAT16 = 1, 7, 10  # onnx TensorProto.DataType


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def key(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def int_field(field: int, value: int) -> bytes:
    return key(field, VARINT) + varint(value)


def bytes_field(field: int, payload: bytes) -> bytes:
    return key(field, LEN) + varint(len(payload)) + payload


def str_field(field: int, text: str) -> bytes:
    return bytes_field(field, text.encode())


def tensor(
    name: str,
    dims: tuple[int, ...],
    values: np.ndarray | None = None,
    data_type: int = FLOAT,
    as_raw: bool = True,
    packed_dims: bool = False,
) -> bytes:
    """A TensorProto: dims 1, data_type 2, float_data 4 (packed), name 8, raw_data 9."""
    if packed_dims:
        out = bytes_field(1, b"".join(varint(d) for d in dims))
    else:
        out = b"".join(int_field(1, d) for d in dims)
    out += int_field(2, data_type)
    out += str_field(8, name)
    out += str_field(12, "a doc string the reader must skip")
    if values is not None:
        payload = np.ascontiguousarray(values).astype("<f4").tobytes()
        out += bytes_field(9 if as_raw else 4, payload)
    return out


def node(op_type: str, inputs: list[str], outputs: list[str]) -> bytes:
    """A NodeProto: input 1, output 2, name 3, op_type 4, attribute 5."""
    out = b"".join(str_field(1, i) for i in inputs)
    out += b"".join(str_field(2, o) for o in outputs)
    out += str_field(3, f"{op_type}_node")
    out += bytes_field(5, str_field(1, "axis") + int_field(3, 1))  # an AttributeProto
    return out + str_field(4, op_type)


def model(nodes: list[bytes], initializers: list[bytes], trailer: bool = True) -> bytes:
    """A ModelProto around a GraphProto (nodes field 1, initializers field 5), with unrelated
    fields of every wire type around them."""
    graph = str_field(2, "main_graph")
    graph += b"".join(bytes_field(1, n) for n in nodes)
    graph += b"".join(bytes_field(5, t) for t in initializers)
    graph += bytes_field(11, str_field(1, "input"))  # a ValueInfoProto
    return (
        int_field(1, 8)  # ir_version
        + str_field(2, "pytorch")  # producer_name
        + key(20, FIXED64)
        + bytes(8)
        + key(21, FIXED32)
        + bytes(4)
        + bytes_field(8, str_field(1, "") + int_field(2, 17))  # opset_import
        + bytes_field(7, graph)
        + (str_field(10, "a trailing doc string") if trailer else b"")
    )


def test_encoder_writes_multi_byte_varints() -> None:
    assert varint(1) == b"\x01"
    assert varint(300) == b"\xac\x02"
    assert varint(2**35) == b"\x80\x80\x80\x80\x80\x01"


# --- initializers --------------------------------------------------------------------------------


def test_raw_data_initializer_keeps_name_shape_and_values() -> None:
    weight = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    graph = parse_onnx(model([], [tensor("encoder.weight", (3, 4), weight)]))
    assert list(graph.initializers) == ["encoder.weight"]
    array = graph.initializers["encoder.weight"]
    assert array.dtype == np.float32 and array.shape == (3, 4)
    np.testing.assert_array_equal(array, weight)


def test_packed_float_data_initializer_is_read() -> None:
    values = np.array([[1.5, -2.25], [3e-8, 1e30]], dtype=np.float32)
    graph = parse_onnx(model([], [tensor("bias", (2, 2), values, as_raw=False)]))
    np.testing.assert_array_equal(graph.initializers["bias"], values)


@pytest.mark.parametrize("packed_dims", [False, True])
def test_packed_and_unpacked_dims_give_the_same_shape(packed_dims: bool) -> None:
    # 300 and 130 need two-byte varints.
    values = np.arange(300 * 130, dtype=np.float32).reshape(1, 300, 130)
    graph = parse_onnx(model([], [tensor("t", (1, 300, 130), values, packed_dims=packed_dims)]))
    assert graph.initializers["t"].shape == (1, 300, 130)
    np.testing.assert_array_equal(graph.initializers["t"], values)


def test_scalar_initializer_has_empty_shape() -> None:
    graph = parse_onnx(model([], [tensor("scale", (), np.array(0.125))]))
    assert graph.initializers["scale"].shape == ()
    assert float(graph.initializers["scale"]) == 0.125


def test_long_names_and_many_initializers_are_all_recovered() -> None:
    names = [f"backbone.encoder.layer.{i}.attention.output.dense.bias" * 3 for i in range(20)]
    assert all(len(n) > 127 for n in names)  # the name length is a multi-byte varint
    inits = [tensor(n, (2,), np.array([i, -i])) for i, n in enumerate(names)]
    graph = parse_onnx(model([], inits))
    assert list(graph.initializers) == names
    for i, name in enumerate(names):
        np.testing.assert_array_equal(graph.initializers[name], [i, -i])


def test_initializers_are_writable_copies() -> None:
    graph = parse_onnx(model([], [tensor("w", (2,), np.array([1.0, 2.0]))]))
    array = graph.initializers["w"]
    assert array.flags.writeable
    array[0] = 7.0  # must not raise (a view of the read-only input bytes would)
    assert graph.initializers["w"][0] == 7.0


def test_non_float_and_data_less_initializers_are_skipped() -> None:
    int64 = (
        int_field(1, 2)
        + int_field(2, INT64)
        + str_field(8, "shape")
        + bytes_field(9, np.array([1, 2], dtype="<i8").tobytes())
    )
    half = (
        int_field(1, 2)
        + int_field(2, FLOAT16)
        + str_field(8, "half")
        + bytes_field(9, np.array([1, 2], dtype="<f2").tobytes())
    )
    external = tensor("stored_elsewhere", (4,), None)  # float, but its data is external
    kept = tensor("kept", (1,), np.array([5.0]))
    graph = parse_onnx(model([], [int64, half, external, kept]))
    assert list(graph.initializers) == ["kept"]


# --- nodes ---------------------------------------------------------------------------------------


def test_nodes_keep_op_type_inputs_and_outputs_in_order() -> None:
    nodes = [
        node("MatMul", ["x", "onnx::MatMul_12"], ["mm_out"]),
        node("Add", ["backbone.layer.0.bias", "mm_out"], ["add_out"]),
        node("Split", ["add_out"], ["q", "k", "v"]),
        node("Identity", [], []),
    ]
    weight = np.eye(2, dtype=np.float32)
    graph = parse_onnx(model(nodes, [tensor("onnx::MatMul_12", (2, 2), weight)]))
    assert graph.nodes == [
        OnnxNode("MatMul", ("x", "onnx::MatMul_12"), ("mm_out",)),
        OnnxNode("Add", ("backbone.layer.0.bias", "mm_out"), ("add_out",)),
        OnnxNode("Split", ("add_out",), ("q", "k", "v")),
        OnnxNode("Identity", (), ()),
    ]
    np.testing.assert_array_equal(graph.initializers["onnx::MatMul_12"], weight)


def test_empty_graph_parses_to_nothing() -> None:
    graph = parse_onnx(model([], []))
    assert graph.initializers == {} and graph.nodes == []


# --- invalid input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello world, not a model",
        int_field(1, 8) + str_field(2, "no graph here"),
        key(7, VARINT) + varint(5),  # a graph field of the wrong wire type
        key(3, 3),  # wire type 3 (start group) is not used by ONNX
    ],
    ids=["empty", "text", "no-graph", "graph-not-a-message", "group-wire-type"],
)
def test_input_that_is_not_a_model_raises_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_onnx(data)


def test_truncated_varint_raises_value_error() -> None:
    with pytest.raises(ValueError):
        parse_onnx(b"\xff")


def test_every_truncation_of_a_model_raises_value_error() -> None:
    # The graph is the last field, so every cut falls inside it (or removes it).
    data = model(
        [node("MatMul", ["x", "w"], ["y"])],
        [tensor("w", (2, 2), np.ones((2, 2))), tensor("b", (2,), np.zeros(2))],
        trailer=False,
    )
    parse_onnx(data)  # the whole model is fine
    outcomes = {}
    for cut in range(1, len(data)):
        try:
            parse_onnx(data[:-cut])
            outcomes[cut] = "parsed"
        except ValueError:
            continue
        except Exception as error:  # noqa: BLE001 - recorded for the message below
            outcomes[cut] = type(error).__name__
    assert outcomes == {}
