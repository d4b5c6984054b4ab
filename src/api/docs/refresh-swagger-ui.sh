#!/usr/bin/env bash
# Refreshes the vendored Swagger UI that `GET /docs` serves from the binary (never from a CDN).
# Usage: bash src/api/docs/refresh-swagger-ui.sh [VERSION]   (default: the version in swagger-ui/VERSION)
# Then rebuild, look at /docs, run tests/browser, and commit swagger-ui/ with the new VERSION.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version="${1:-$(cat "$here/swagger-ui/VERSION")}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "swagger-ui-dist@$version" >/dev/null && tar xzf "swagger-ui-dist-$version.tgz")
# Only what the page loads, and the licence texts that must travel with it.
for file in swagger-ui-bundle.js swagger-ui-bundle.js.LICENSE.txt swagger-ui.css LICENSE NOTICE; do
    cp "$work/package/$file" "$here/swagger-ui/$file"
done
echo "$version" > "$here/swagger-ui/VERSION"
echo "swagger-ui-dist $version vendored into $here/swagger-ui"
