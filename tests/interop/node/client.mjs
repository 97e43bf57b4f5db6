// The official Connect client for Node against metald: every protocol, both HTTP versions,
// with and without gzip, the lifecycle, an error code, shared-connection early answers, health.
// Usage: node client.mjs <base-url>; prints one JSON object per case, then {"done": true}.
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import {
  compressionGzip, createConnectTransport, createGrpcTransport, createGrpcWebTransport,
} from "@connectrpc/connect-node";
import { Health, HealthCheckResponse_ServingStatus } from "./gen/grpc/health/v1/health_pb.js";
import { CreateVmRequestSchema, VmService } from "./gen/metal/vmprovisioner/v1/vm_pb.js";

const baseUrl = process.argv[2];
const config = { cpu: { vcpuCount: 1 }, memory: { sizeBytes: 128n << 20n } };

const cases = [];
for (const gzip of [false, true]) {
  const compression = gzip ? { sendCompression: compressionGzip, acceptCompression: [compressionGzip] } : {};
  for (const httpVersion of ["1.1", "2"]) {
    cases.push([`connect-json h${httpVersion}${gzip ? " gzip" : ""}`,
      createConnectTransport({ baseUrl, httpVersion, useBinaryFormat: false, ...compression })]);
    cases.push([`connect-binary h${httpVersion}${gzip ? " gzip" : ""}`,
      createConnectTransport({ baseUrl, httpVersion, useBinaryFormat: true, ...compression })]);
    cases.push([`grpc-web h${httpVersion}${gzip ? " gzip" : ""}`,
      createGrpcWebTransport({ baseUrl, httpVersion, ...compression })]);
  }
  cases.push([`grpc h2${gzip ? " gzip" : ""}`, createGrpcTransport({ baseUrl, ...compression })]);
}

async function codeOf(promise) {
  try { await promise; return "ok"; } catch (e) { return Code[ConnectError.from(e).code]; }
}

let n = 0;
for (const [name, transport] of cases) {
  const client = createClient(VmService, transport);
  const id = `node-${n++}`;
  const steps = [];
  const created = await client.createVm({ vmId: id, config });
  steps.push(created.vmId === id);
  steps.push((await client.bootVm({ vmId: id })).state);
  steps.push((await client.pauseVm({ vmId: id })).state);
  steps.push((await client.resumeVm({ vmId: id })).state);
  steps.push((await client.rebootVm({ vmId: id })).success);
  steps.push((await client.getVmInfo({ vmId: id })).vmId === id);
  steps.push((await client.listVms({})).vms.some((v) => v.vmId === id));
  steps.push((await client.shutdownVm({ vmId: id })).state);
  steps.push((await client.deleteVm({ vmId: id })).success);
  const missing = await codeOf(client.getVmInfo({ vmId: id }));
  const invalid = await codeOf(client.getVmInfo({ vmId: "not valid!" }));
  // early answers next to ordinary calls on the same connection
  const big = create(CreateVmRequestSchema, { vmId: "big", config: { ...config, metadata: { blob: "x".repeat(3 << 20) } } });
  const batch = [];
  for (let i = 0; i < 10; i++) batch.push(codeOf(client.listVms({})));
  batch.push(codeOf(client.createVm(big)));
  batch.push(codeOf(client.listVms({}, { timeoutMs: 1 })));
  const aborted = new AbortController();
  batch.push(codeOf(client.listVms({}, { signal: aborted.signal })));
  aborted.abort();
  for (let i = 0; i < 10; i++) batch.push(codeOf(client.listVms({})));
  const results = await Promise.all(batch);
  const health = await createClient(Health, transport).check({});
  console.log(JSON.stringify({
    name, steps, missing, invalid,
    neighbours: results.slice(0, 10).concat(results.slice(13)),
    oversize: results[10], deadline: results[11], cancelled: results[12],
    health: HealthCheckResponse_ServingStatus[health.status],
  }));
}
console.log(JSON.stringify({ done: true }));
