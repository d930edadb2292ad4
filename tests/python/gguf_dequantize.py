"""A GGUF with every tensor dequantized to F32 and every metadata key kept, written with gguf-py (used by
tests/gguf.rs: without quantized matmuls, llama.cpp computes a model to float rounding, so a rewrite can be
shown to compute what the original computes).

Usage: gguf_dequantize.py INPUT_GGUF OUTPUT_GGUF
"""
import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

source, target = sys.argv[1:3]
reader = GGUFReader(source)
writer = GGUFWriter(target, reader.fields["general.architecture"].contents())
for key, field in reader.fields.items():
    if key.startswith("GGUF.") or key == "general.architecture":
        continue
    kind = GGUFValueType(field.types[0])
    if key == "general.file_type":
        writer.add_key_value(key, 0, kind)  # ALL_F32
        continue
    sub = GGUFValueType(field.types[-1]) if kind == GGUFValueType.ARRAY else None
    writer.add_key_value(key, field.contents(), kind, sub_type=sub)
for t in reader.tensors:
    values = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
    writer.add_tensor(t.name, values)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
