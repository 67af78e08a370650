"""Run by a Python with TensorFlow and tf2onnx (tests/test_keras.py): a small Keras CNN with
its preprocessing inside (Rescaling), exported by tf2onnx with its defaults (channels-last),
and TensorFlow's float64 gradient of the probability of class `target` at `pixels`.

usage: python keras_export.py OUT_DIR    (writes OUT_DIR/cnn.onnx and OUT_DIR/reference.npz)
"""

import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf2onnx

SIZE, CLASSES, TARGET = 28, 5, 2


def cnn(dtype):
    keras = tf.keras
    inputs = keras.Input((SIZE, SIZE, 3), dtype=dtype, name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1, dtype=dtype)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1",
                            dtype=dtype)(x)
    x = keras.layers.MaxPooling2D(dtype=dtype)(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2",
                            dtype=dtype)(x)
    x = keras.layers.Flatten(dtype=dtype)(x)
    outputs = keras.layers.Dense(CLASSES, activation="softmax", name="head", dtype=dtype)(x)
    return keras.Model(inputs, outputs)


def main(out):
    tf.keras.utils.set_random_seed(0)
    model = cnn("float32")
    spec = (tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32, name="image"),)
    tf2onnx.convert.from_keras(model, input_signature=spec, output_path=str(out / "cnn.onnx"))
    double = cnn("float64")
    double.set_weights([w.astype(np.float64) for w in model.get_weights()])
    pixels = np.random.default_rng(0).integers(0, 256, (1, SIZE, SIZE, 3)).astype(np.float64)
    x = tf.constant(pixels)
    with tf.GradientTape() as tape:
        tape.watch(x)
        prob = double(x)[0, TARGET]
    np.savez(out / "reference.npz", pixels=pixels.astype(np.uint8)[0],
             gradient=tape.gradient(prob, x).numpy()[0], target=TARGET)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
