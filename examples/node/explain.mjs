// Run a compiled onnxattr attribution model (onnxattr compile) with onnxruntime-node.
//
//   node explain.mjs MODEL.onnx IMAGE.f32 TARGET OUT.f32
//
// IMAGE.f32: the image as raw float32 little-endian [1, 3, H, W] (RGB, the model's own pixel
// contract: 0..255 for the exported GoogLeNet); H and W come from the model's input.
// TARGET: the class index to explain. OUT.f32: the attribution, raw float32 little-endian
// [1, 3, H, W]. Prints the target's score (probability or logit) as JSON.
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import ort from 'onnxruntime-node';

function readFloat32LE(path) {
  const bytes = readFileSync(path);
  if (bytes.length % 4 !== 0) throw new Error(`${path}: size is not a multiple of 4 bytes`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  const values = new Float32Array(bytes.length / 4);
  for (let i = 0; i < values.length; i++) values[i] = view.getFloat32(4 * i, true);
  return values;
}

function writeFloat32LE(path, values) {
  const view = new DataView(new ArrayBuffer(values.length * 4));
  for (let i = 0; i < values.length; i++) view.setFloat32(4 * i, values[i], true);
  const tmp = `${path}.tmp-${process.pid}`;
  writeFileSync(tmp, new Uint8Array(view.buffer));
  renameSync(tmp, path); // never a half-written output
}

function imageShape(session, valueCount) {
  const meta = session.inputMetadata?.find?.((m) => m.name === 'image');
  const dims = meta?.shape;
  if (dims && dims.length === 4 && dims.slice(1).every((d) => typeof d === 'number')) {
    return [1, ...dims.slice(1)];
  }
  const side = Math.round(Math.sqrt(valueCount / 3)); // older runtimes: assume a square image
  return [1, 3, side, side];
}

async function main() {
  const [modelPath, imagePath, targetText, outPath] = process.argv.slice(2);
  if (!outPath) {
    console.error('usage: node explain.mjs MODEL.onnx IMAGE.f32 TARGET OUT.f32');
    process.exit(2);
  }
  const target = Number.parseInt(targetText, 10);
  if (!Number.isInteger(target) || target < 0) throw new Error(`bad class index ${targetText}`);
  const session = await ort.InferenceSession.create(modelPath);
  const pixels = readFloat32LE(imagePath);
  const shape = imageShape(session, pixels.length);
  if (shape.reduce((a, b) => a * b) !== pixels.length) {
    throw new Error(`${imagePath}: ${pixels.length} values, the model takes [${shape}]`);
  }
  const results = await session.run({
    image: new ort.Tensor('float32', pixels, shape),
    target: new ort.Tensor('int64', BigInt64Array.from([BigInt(target)]), [1]),
  });
  const scoreName = session.outputNames.find((n) => n !== 'attribution');
  if (results.attribution.data.some(Number.isNaN)) { // what the model gives a bad class index
    throw new Error(`class index ${target} is out of range for this model (NaN attribution)`);
  }
  writeFloat32LE(outPath, results.attribution.data);
  console.log(JSON.stringify({ target, [scoreName]: results[scoreName].data[target],
                               shape: results.attribution.dims }));
}

main().catch((err) => {
  console.error(`error: ${err.message}`);
  process.exit(1);
});
