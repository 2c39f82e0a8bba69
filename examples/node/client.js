#!/usr/bin/env node
// A Node.js client for edgecow built from the repository's proto/ files at run time: the standard gRPC
// health check, ServerLive/ServerReady, ModelMetadata, and one ModelInfer whose FP32 tensors travel as
// raw little-endian bytes (raw_input_contents / raw_output_contents).
//
//   node client.js [--target HOST:PORT] [--model NAME] [--count N] [--json]
//
// Every FP32 input gets N values (dimensions of -1 become N, fixed ones stay); input k holds
// (k + 1) * (j - N / 2) / 4 for element j, numbers a float32 holds exactly.
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_DIR = process.env.EDGECOW_PROTO_DIR || path.join(__dirname, "..", "..", "proto");

function parseArgs(argv) {
  const args = { target: "127.0.0.1:8001", model: "identity", count: 8, json: false };
  for (let i = 0; i < argv.length; i += 1) {
    const flag = argv[i];
    if (flag === "--json") {
      args.json = true;
    } else if (flag === "--target" || flag === "--model" || flag === "--count") {
      const value = argv[i + 1];
      if (value === undefined) throw new Error(`${flag} needs a value`);
      args[flag.slice(2)] = flag === "--count" ? Number.parseInt(value, 10) : value;
      i += 1;
    } else {
      throw new Error(`unknown argument ${flag}; use --target, --model, --count or --json`);
    }
  }
  if (!Number.isInteger(args.count) || args.count < 1) throw new Error("--count must be a positive integer");
  return args;
}

function load(file) {
  // longs: String keeps int64 fields exact (a JavaScript number holds 53 bits); shapes are converted
  // with Number() below, which is exact for any real tensor dimension.
  return grpc.loadPackageDefinition(protoLoader.loadSync(file, {
    keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
  }));
}

// Promise form of a unary call, with a deadline so a missing server fails instead of hanging.
function call(client, method, request, seconds = 10) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + seconds * 1000);
    client[method](request, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

function shapeFor(dims, count) {
  return dims.map((dim) => (Number(dim) < 0 ? count : Number(dim)));
}

function encodeFp32(values) {
  const bytes = Buffer.alloc(values.length * 4);
  values.forEach((value, j) => bytes.writeFloatLE(value, j * 4));
  return bytes;
}

function decodeFp32(raw) {
  // raw_output_contents arrives as a Buffer that is a slice of the received message: its byteOffset is
  // often not a multiple of 4, and new Float32Array(buffer, offset) throws on that. Copy first (and read
  // little-endian explicitly, so a big-endian host decodes it right too).
  const copy = Buffer.from(raw);
  const values = new Array(copy.length / 4);
  for (let j = 0; j < values.length; j += 1) values[j] = copy.readFloatLE(j * 4);
  return values;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const { inference } = load(path.join(PROTO_DIR, "inference.proto"));
  const health = load(path.join(__dirname, "health.proto")).grpc.health.v1;
  const credentials = grpc.credentials.createInsecure();
  // The server accepts large raw messages; let this client receive them too.
  const options = { "grpc.max_receive_message_length": -1, "grpc.max_send_message_length": -1 };
  const v2 = new inference.GRPCInferenceService(args.target, credentials, options);
  const healthClient = new health.Health(args.target, credentials, options);

  const report = { target: args.target, model: args.model };
  report.health = (await call(healthClient, "Check", { service: "" })).status;
  report.live = (await call(v2, "ServerLive", {})).live;
  report.ready = (await call(v2, "ServerReady", {})).ready;

  const meta = await call(v2, "ModelMetadata", { name: args.model, version: "" });
  const describe = (t) => ({ name: t.name, datatype: t.datatype, shape: t.shape.map(Number) });
  report.metadata = {
    name: meta.name, versions: meta.versions, platform: meta.platform,
    inputs: meta.inputs.map(describe), outputs: meta.outputs.map(describe),
  };
  const unsupported = meta.inputs.concat(meta.outputs).filter((t) => t.datatype !== "FP32");
  if (unsupported.length > 0) {
    throw new Error(`this example sends FP32 only; ${args.model} has ${unsupported.map((t) => `${t.name} ${t.datatype}`).join(", ")}`);
  }

  const inputs = meta.inputs.map((t, k) => {
    const shape = shapeFor(t.shape, args.count);
    const size = shape.reduce((a, b) => a * b, 1);
    const values = Array.from({ length: size }, (_, j) => ((k + 1) * (j - size / 2)) / 4);
    return { name: t.name, datatype: "FP32", shape, values };
  });
  const response = await call(v2, "ModelInfer", {
    model_name: args.model,
    model_version: "",
    id: "node-example",
    // int64 shape fields take strings (or numbers); the bytes go in raw_input_contents, one entry per
    // input in the same order, and the tensors themselves carry no contents.
    inputs: inputs.map((t) => ({ name: t.name, datatype: t.datatype, shape: t.shape.map(String) })),
    outputs: meta.outputs.map((t) => ({ name: t.name })),
    raw_input_contents: inputs.map((t) => encodeFp32(t.values)),
  });
  report.inputs = inputs;
  report.outputs = response.outputs.map((t, i) => ({
    name: t.name, datatype: t.datatype, shape: t.shape.map(Number),
    values: decodeFp32(response.raw_output_contents[i]),
  }));
  v2.close();
  healthClient.close();

  if (args.json) {
    process.stdout.write(`${JSON.stringify(report)}\n`);
    return;
  }
  console.log(`health ${report.health}, live ${report.live}, ready ${report.ready} at ${args.target}`);
  const fmt = (t) => `${t.name} ${t.datatype}[${t.shape.join(",")}]`;
  console.log(`model ${meta.name} versions [${meta.versions.join(",")}] platform ${meta.platform}`);
  console.log(`  inputs  ${report.metadata.inputs.map(fmt).join(", ")}`);
  console.log(`  outputs ${report.metadata.outputs.map(fmt).join(", ")}`);
  for (const t of report.inputs) console.log(`in  ${fmt(t)} = ${t.values.join(" ")}`);
  for (const t of report.outputs) console.log(`out ${fmt(t)} = ${t.values.join(" ")}`);
}

main().catch((error) => {
  const code = error.code === undefined ? "" : ` (gRPC status ${grpc.status[error.code] ?? error.code})`;
  console.error(`edgecow node example: ${error.details || error.message}${code}`);
  process.exit(1);
});
