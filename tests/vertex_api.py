"""Vertex AI request bodies parsed into google-cloud-aiplatform's v1 message types (the test extras install it).

Parsing is strict: a misspelled or misplaced field, a wrong type or an unknown enum value raises ParseError, so a
launcher that prints a body Vertex AI would reject fails its test here instead of in front of a user.
"""

import pytest


def parse(body: dict, message: str):
    """The body as the named aiplatform_v1 message (CustomJob, HyperparameterTuningJob, Model, ...)."""
    types = pytest.importorskip("google.cloud.aiplatform_v1.types", reason="google-cloud-aiplatform is not installed "
                                "(pip install -e '.[test]')")
    from google.protobuf import json_format

    message_type = getattr(types, message)
    return json_format.ParseDict(body, message_type.pb(message_type()), ignore_unknown_fields=False)
