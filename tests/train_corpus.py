"""A tiny synthetic BEIR corpus for the training tests (not a test module itself).

Every topic has a *positive* document written as a plain summary and a *distractor* that parrots
the query's words. The base MiniLM prefers the parrot; a few training steps teach it to prefer
the summaries, which carries over to held-out (dev and test) topics.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

TOPICS = [
    ("glaciers", "ice sheets move slowly downhill and carve valleys"),
    ("volcanoes", "magma rises through the crust and erupts as lava"),
    ("honeybees", "worker insects gather nectar and build wax combs"),
    ("tides", "the moon's gravity lifts the oceans twice a day"),
    ("rust", "iron reacts with oxygen and water to form oxide"),
    ("photosynthesis", "leaves turn sunlight, water and carbon dioxide into sugar"),
    ("vaccines", "weakened antigens train the immune system to respond"),
    ("earthquakes", "tectonic plates slip along faults and release energy"),
    ("coral reefs", "tiny polyps secrete limestone skeletons in warm seas"),
    ("comets", "icy bodies grow glowing tails near the sun"),
    ("bread", "yeast ferments sugar and the gas makes dough rise"),
    ("rainbows", "droplets split sunlight into its colours"),
    ("batteries", "chemical reactions push electrons through a circuit"),
    ("fossils", "minerals replace buried bones over millions of years"),
    ("hurricanes", "warm ocean water feeds rotating storm systems"),
    ("antibiotics", "drugs kill bacteria or stop them from multiplying"),
    ("deserts", "little rain falls and evaporation exceeds precipitation"),
    ("magnets", "aligned electron spins create a magnetic field"),
    ("sleep", "the brain consolidates memories during deep rest"),
    ("cheese", "bacteria and rennet curdle milk which is then aged"),
    ("lightning", "charge separation in clouds discharges as a spark"),
    ("wind power", "turbine blades turn a generator in moving air"),
    ("caffeine", "it blocks adenosine receptors and reduces tiredness"),
    ("tsunamis", "undersea earthquakes displace huge volumes of water"),
    ("penguins", "flightless seabirds swim with flipper-like wings"),
    ("solar eclipses", "the moon passes between the earth and the sun"),
    ("insulin", "a hormone that lets cells absorb glucose from blood"),
    ("compost", "microbes break down food scraps into humus"),
    ("auroras", "solar particles excite gases high in the atmosphere"),
    ("sourdough", "wild yeast and lactic bacteria leaven the loaf"),
]
TEST_TOPICS = {"lightning", "wind power", "caffeine", "tsunamis", "penguins", "solar eclipses"}


def query_text(topic: str) -> str:
    return f"tell me about {topic} please, what do you know about {topic}"


def write_corpus(root: Path, topics=TOPICS, test_topics=TEST_TOPICS) -> Path:
    """Write corpus.jsonl, queries.jsonl, qrels/train.tsv and qrels/test.tsv under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    docs, queries, train, test = [], [], [], []
    for i, (topic, fact) in enumerate(topics):
        docs.append({"_id": f"pos{i}", "title": topic.title(), "text": f"Summary. {fact.capitalize()}."})
        docs.append({"_id": f"par{i}", "title": f"About {topic}", "text": query_text(topic) + " ? tell me more."})
        queries.append({"_id": f"q{i}", "text": query_text(topic)})
        (test if topic in test_topics else train).append(f"q{i}\tpos{i}\t1")
    (root / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (root / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries) + "\n")
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(train) + "\n")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(test) + "\n")
    return root


def write_spec(path: Path, corpus: Path, workspace: Path, **train) -> Path:
    """A pipeline spec over the tiny corpus with a quick training section."""
    import yaml

    t = {"enabled": True, "epochs": 2, "batch_size": 8, "learning_rate": 1e-4, "temperature": 0.05,
         "hard_negatives": 2, "negatives_per_example": 1, "mining_depth": 5, "dev_fraction": 0.25,
         "checkpoint_every": 2, "threads": 2, "max_passage_length": 64, "dev_pool_depth": 5,
         "reranker": {"batch_size": 8, "doc_length": 48, "query_length": 16, "learning_rate": 1e-4,
                      "depth": 10, "epochs": 1}}
    t.update(train)
    spec = {"name": "tiny", "source": {"format": "beir", "path": str(corpus)},
            "clean": {"near_duplicates": {"enabled": False}},
            "chunk": {"max_tokens": 64, "overlap_tokens": 8},
            "model": {"name": "default", "batch_size": 32, "max_seq_length": 64, "device": "cpu"},
            "index": {"dense": {"factory": "Flat"}},
            "tracking": {"experiment": "tiny"},
            "evaluate": {"split": "test", "k": 10},
            "workspace": str(workspace), "train": t}
    path.write_text(yaml.safe_dump(spec))
    return path


@contextlib.contextmanager
def cpu_burner():
    """A process that keeps one core busy for the duration of the block (machine load for determinism tests)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)
