// Validates each ServiceMonitor in the given files against prometheus-operator's CRD schema,
// as shipped (generated from the CRDs) in @kubernetes-models/prometheus-operator. Unknown
// fields fail, as in the API server's structural schema.
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

let checked = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of parseAllDocuments(readFileSync(file, "utf8"))) {
    if (doc.errors.length) throw new Error(`${file}: ${doc.errors[0].message}`);
    const object = doc.toJS();
    if (object?.kind !== "ServiceMonitor") continue;
    try {
      new ServiceMonitor(object).validate();
    } catch (error) {
      console.error(`ERROR ${file}: ServiceMonitor/${object.metadata?.name}: ${error.message}`);
      process.exit(1);
    }
    checked += 1;
    console.log(`INFO ${file} passed for ServiceMonitor/${object.metadata.name} against monitoring.coreos.com/v1`);
  }
}
if (checked === 0) {
  console.error("ERROR no ServiceMonitor found");
  process.exit(1);
}
