"""A fake grand-challenge.org for tests and demos: an in-memory world served over loopback HTTP.

    from gcfs.fakegc import FakeGC, World, demo_world, DEMO_TOKEN

- `world`: the data model, its builders and `demo_world()`;
- `serializers`: objects to the JSON the real API emits, key order included;
- `api`: routing, auth, filters, pagination and website pages, independent of sockets;
- `storage`: the object store's signed URLs, object keys, Range parsing and S3-style errors;
- `server`: `FakeGC`, the threaded HTTP/1.1 servers (site and storage) with counters and knobs.

Standard library only at run time. See gc-api.md for the behaviour it follows.
"""

from gcfs.fakegc.api import ENDPOINTS
from gcfs.fakegc.server import FakeGC, RequestRecord
from gcfs.fakegc.world import (
    DEMO_B_TOKEN,
    DEMO_TOKEN,
    EDITOR_TOKEN,
    Algorithm,
    AlgorithmImage,
    AlgorithmInterface,
    Answer,
    Archive,
    ArchiveItem,
    ComponentInterface,
    ComponentInterfaceValue,
    DicomInstance,
    DisplaySet,
    GeneratedContent,
    GeneratedItems,
    Image,
    ImageFile,
    Job,
    Question,
    QuestionOption,
    ReaderStudy,
    User,
    World,
    demo_world,
    stable_pk,
)

__all__ = [
    "DEMO_B_TOKEN",
    "DEMO_TOKEN",
    "EDITOR_TOKEN",
    "ENDPOINTS",
    "Algorithm",
    "AlgorithmImage",
    "AlgorithmInterface",
    "Answer",
    "Archive",
    "ArchiveItem",
    "ComponentInterface",
    "ComponentInterfaceValue",
    "DicomInstance",
    "DisplaySet",
    "FakeGC",
    "GeneratedContent",
    "GeneratedItems",
    "Image",
    "ImageFile",
    "Job",
    "Question",
    "QuestionOption",
    "ReaderStudy",
    "RequestRecord",
    "User",
    "World",
    "demo_world",
    "stable_pk",
]
