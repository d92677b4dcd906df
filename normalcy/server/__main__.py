"""`python -m normalcy.server > docs/openapi.json` writes the service's OpenAPI schema."""

import json

from normalcy.server.app import openapi_schema

print(json.dumps(openapi_schema(), indent=2, sort_keys=True))
