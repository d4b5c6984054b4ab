// What a web team writes with the client generated from openapi/openapi.json: send a mail, then read
// a problem+json refusal. tsc checks it against the generated types; running it checks the live
// relay answers as the document says. Usage: node dist/send-mail.js BASE_URL API_KEY
import createClient from "openapi-fetch";

import type { components, paths } from "./generated/api.js";

type Problem = components["schemas"]["Problem"];

const [baseUrl, apiKey] = process.argv.slice(2);
if (!baseUrl || !apiKey) throw new Error("usage: send-mail.js BASE_URL API_KEY");

const client = createClient<paths>({ baseUrl, headers: { authorization: `Bearer ${apiKey}` } });

function fail(message: string): never {
  console.error(`FAIL ${message}`);
  process.exit(1);
}

// The fields are read, not just printed: a runtime check of what the types promise.
function checkProblem(problem: Problem, status: number): void {
  if (typeof problem.code !== "string" || typeof problem.detail !== "string") fail(`problem without code/detail: ${JSON.stringify(problem)}`);
  if (problem.status !== status) fail(`problem.status ${problem.status}, HTTP ${status}`);
  if (!problem.type.endsWith(`/${problem.code}`)) fail(`type ${problem.type} does not name code ${problem.code}`);
}

const subject = process.env.MAIL_MARKER ?? `typed-client-${Date.now()}`;
const sent = await client.POST("/mail", {
  params: { header: { "Idempotency-Key": `client-${subject}` } },
  body: { from: "noreply@contoso.com", to: ["alice@contoso.com"], subject, text: "sent by the generated client" },
});
if (sent.error !== undefined) fail(`POST /mail answered ${sent.response.status}: ${JSON.stringify(sent.error)}`);
const accepted = sent.data;
if (sent.response.status !== 202) fail(`expected 202, got ${sent.response.status}`);
// Without `Prefer: respond-async` the answer is the synchronous one (MailAccepted, not MailQueued).
if (!("acceptedRecipients" in accepted) || typeof accepted.id !== "string" || !accepted.messageId.startsWith("<") || !accepted.acceptedRecipients.includes("alice@contoso.com")) {
  fail(`the 202 body does not match MailAccepted: ${JSON.stringify(accepted)}`);
}
console.log(`sent ${accepted.id} ${accepted.messageId}`);

const refused = await client.POST("/mail", {
  body: { from: "noreply@contoso.com", to: ["not-an-address"], subject, text: "refused" },
});
if (refused.error === undefined) fail(`an invalid recipient was accepted: ${refused.response.status}`);
const problem: Problem = refused.error;
checkProblem(problem, refused.response.status);
if (refused.response.status !== 400 || problem.code !== "invalid_request") fail(`expected 400 invalid_request, got ${refused.response.status} ${problem.code}`);
const field = problem.errors?.find((e) => e.field === "to[0]");
if (!field) fail(`errors[] does not name to[0]: ${JSON.stringify(problem.errors)}`);
if (refused.response.headers.get("content-type") !== "application/problem+json") fail("the refusal is not application/problem+json");
console.log(`refused ${problem.code}: ${field.field}: ${field.message}`);
