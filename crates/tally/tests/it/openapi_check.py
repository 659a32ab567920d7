"""Validates Grafana API answers against the plugin's OpenAPI file.

Usage: openapi_check.py OPENAPI_YAML ANSWERS_JSON, where ANSWERS_JSON is a list of
{"path": "/metrics", "body": <the JSON answer>}. Each body is checked against the schema of
that path's POST 200 response; the first mismatch is printed and the exit status is 1.
"""

import json
import sys

import jsonschema
import yaml


def main() -> int:
    spec = yaml.safe_load(open(sys.argv[1], encoding="utf-8"))
    answers = json.load(open(sys.argv[2], encoding="utf-8"))
    for answer in answers:
        path = answer["path"]
        schema = spec["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        # `#/components/...` references resolve inside the schema document itself.
        schema = dict(schema, components=spec.get("components", {}))
        try:
            jsonschema.validate(answer["body"], schema)
        except jsonschema.ValidationError as e:
            print(f"{path}: {e.message} at {list(e.absolute_path)}")
            return 1
    print(f"{len(answers)} answers valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
