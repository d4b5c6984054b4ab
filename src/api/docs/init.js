// Starts Swagger UI on this relay's own OpenAPI document. A file of its own, not an inline
// script, so that the page's Content-Security-Policy can forbid inline scripts.
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    // BASE/docs -> BASE/openapi.json; the document's `servers` entry carries the base path.
    url: new URL("openapi.json", window.location.href).href,
    dom_id: "#swagger-ui",
    deepLinking: true,
    // Open "try it out" at once: the page exists to send a first mail.
    tryItOutEnabled: true,
    // The default validator is an outside service; the page must work air-gapped.
    validatorUrl: null,
    // The API key stays in this tab, not in localStorage.
    persistAuthorization: false,
    displayRequestDuration: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
