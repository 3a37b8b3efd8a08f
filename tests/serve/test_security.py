"""No request reaches outside its sandbox: run-time adapter loading is off unless a directory is
allowed, and then reads only under it (symlinks resolved), up to a cap, with errors that do not tell
whether a path exists; loopback servers check the Host header; /v1/models shows no server paths."""

import http.client
import json
import shutil

import openai
import pytest

from tests.serve.conftest import LiveServer, get_json

PROMPT = [{"role": "user", "content": "Reverse the word: apple"}]


@pytest.fixture(scope="module")
def sandbox(serve_models, tmp_path_factory):
    """allowed/ holds two adapter copies, a file, a link to a copy and a link that points out of it."""
    root = tmp_path_factory.mktemp("sandbox")
    allowed = root / "allowed"
    allowed.mkdir()
    shutil.copytree(serve_models["style"], allowed / "style-copy")
    shutil.copytree(serve_models["reverse"], allowed / "reverse-copy")
    (allowed / "notes.txt").write_text("not an adapter")
    (allowed / "inner-link").symlink_to(allowed / "style-copy", target_is_directory=True)
    (allowed / "escape").symlink_to(serve_models["style"], target_is_directory=True)  # a valid adapter, outside
    outside = root / "outside"
    shutil.copytree(serve_models["style"], outside)
    return {"root": root, "allowed": allowed, "outside": outside}


def start(serve_models, **limits):
    from qwenlab.serve import ServeConfig, ServeLimits, build_app

    config = ServeConfig(base=str(serve_models["base"]), served_model_name="base", max_batch=4,
                         adapters={"math": str(serve_models["math"])}, limits=ServeLimits(**limits))
    return LiveServer(build_app(config))


def load(client, name: str, path: str) -> dict:
    return client.post("/load_lora_adapter", body={"lora_name": name, "lora_path": path}, cast_to=object)


def load_error(client, name: str, path: str) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as error:
        load(client, name, path)
    return error.value.status_code, error.value.body


def chat(client, model: str) -> str:
    return client.chat.completions.create(model=model, messages=PROMPT, max_tokens=10,
                                          temperature=0).choices[0].message.content


def test_loading_is_off_without_allow_adapter_dir(serve_models, sandbox):
    with start(serve_models) as live:
        client = live.client()
        for path in (str(sandbox["allowed"] / "style-copy"), str(serve_models["style"]), "/no/such/folder"):
            status, body = load_error(client, "style", path)
            assert status == 403 and body["code"] == "adapter_loading_disabled"
            assert "--allow-adapter-dir" in body["message"]
        assert "style" not in {m.id for m in client.models.list().data}


def test_loading_reads_only_under_the_allowed_dir(serve_models, sandbox, reference):
    allowed = sandbox["allowed"]
    with start(serve_models, allow_adapter_dir=str(allowed), max_adapters=3) as live:
        client = live.client()
        refused = {
            "outside, exists": str(sandbox["outside"]),
            "outside, missing": str(sandbox["root"] / "no-such-adapter"),
            "missing everywhere": "/no/such/folder",
            "dot-dot out, exists": "../outside",
            "inside, missing": "no-such-adapter",
            "a symlink inside pointing out": "escape",
            "through that symlink": str(allowed / "escape"),
            "a file inside": "notes.txt",
            "the system's files": "/etc",
        }
        bodies = {case: load_error(client, "style", path) for case, path in refused.items()}
        first = next(iter(bodies.values()))
        assert first[0] == 400 and first[1]["code"] == "invalid_adapter_path" and first[1]["param"] == "lora_path"
        for case, reply in bodies.items():
            assert reply == first, case  # one answer: nothing tells which paths exist
        for forbidden in (str(sandbox["root"]), "outside", "no-such-adapter", "escape"):
            assert forbidden not in first[1]["message"]
        assert {m.id for m in client.models.list().data} == {"base", "math"}

        load(client, "style", "style-copy")  # relative to the allowed dir
        load(client, "rev", str(allowed / "reverse-copy"))  # absolute, inside
        assert chat(client, "style") == reference("style", PROMPT[0]["content"], chat=True, max_tokens=10).text
        assert chat(client, "rev") == reference("reverse", PROMPT[0]["content"], chat=True, max_tokens=10).text


def test_a_link_inside_to_a_folder_inside_loads(serve_models, sandbox):
    with start(serve_models, allow_adapter_dir=str(sandbox["allowed"])) as live:
        client = live.client()
        load(client, "linked", "inner-link")
        assert "linked" in {m.id for m in client.models.list().data}


def test_loaded_adapters_are_capped(serve_models, sandbox):
    with start(serve_models, allow_adapter_dir=str(sandbox["allowed"]), max_adapters=2) as live:
        client = live.client()
        load(client, "style", "style-copy")  # "math" from the start counts: this is the second
        status, body = load_error(client, "rev", "reverse-copy")
        assert status == 400 and body["code"] == "adapter_limit_reached" and "--max-adapters 2" in body["message"]
        client.post("/unload_lora_adapter", body={"lora_name": "style"}, cast_to=object)
        load(client, "rev", "reverse-copy")  # room again
        assert {m.id for m in client.models.list().data} == {"base", "math", "rev"}


def test_models_show_no_server_paths(serve_models, sandbox):
    from qwenlab.serve import ServeConfig, ServeLimits, build_app

    config = ServeConfig(base=str(serve_models["base"]), served_model_name="base", max_batch=4,
                         adapters={"math": str(serve_models["math"])},
                         variants={"base-int8": str(serve_models["int8"])},
                         limits=ServeLimits(allow_adapter_dir=str(sandbox["allowed"])))
    with LiveServer(build_app(config)) as live:
        load(live.client(), "style", str(sandbox["allowed"] / "style-copy"))
        listing = get_json(live.url + "/v1/models")
        one = get_json(live.url + "/v1/models/style")
    text = json.dumps([listing, one])
    for folder in (serve_models["base"].parent, sandbox["root"]):
        assert str(folder) not in text
    roots = {card["id"]: card["root"] for card in listing["data"]}
    assert roots == {"base": "base", "math": "math", "base-int8": "int8", "style": "style-copy"}
    assert one["root"] == "style-copy"


def request_with_host(server, host: str | None, path: str = "/health") -> tuple[int, dict | str]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("GET", path, skip_host=True)
    if host is not None:
        connection.putheader("Host", host)
    connection.endheaders()
    response = connection.getresponse()
    data = response.read().decode()
    return response.status, (json.loads(data) if response.getheader("content-type", "").startswith(
        "application/json") else data)


@pytest.fixture(scope="module")
def plain_server(serve_models):
    with start(serve_models) as live:
        yield live


@pytest.mark.parametrize("host", ["localhost", "localhost:{port}", "127.0.0.1:{port}", "127.0.0.1",
                                  "[::1]:{port}", "[::1]", "LOCALHOST:{port}"])
def test_loopback_host_names_are_answered(plain_server, host):
    status, body = request_with_host(plain_server, host.format(port=plain_server.port))
    assert status == 200 and body["status"] == "ok"


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "localhost.evil.example:{port}",
                                  "127.0.0.1.nip.io:{port}", "10.0.0.5:{port}", "", None])
@pytest.mark.parametrize("path", ["/health", "/", "/v1/models"])
def test_other_host_names_are_refused(plain_server, host, path):
    """A DNS-rebinding page (evil.example now resolving to 127.0.0.1) sends its own name as Host."""
    status, body = request_with_host(plain_server, None if host is None else host.format(port=plain_server.port),
                                     path)
    assert status == 421 and body["error"]["code"] == "invalid_host"


def test_host_names_answered_per_bind_address():
    from qwenlab.serve.limits import allowed_host_names, host_name

    assert allowed_host_names("127.0.0.2") >= {"127.0.0.2", "localhost", "127.0.0.1", "::1"}
    assert allowed_host_names("0.0.0.0") is None and allowed_host_names("192.168.1.4") is None
    assert host_name("[::1]:8000") == "::1" and host_name("Example.COM.:80") == "example.com"
