"""lacd.ingest.secrets: every planted secret is found, with its kind, and gone from every output;
ordinary lines (the real fixture, generated lessons, stdlib code) are left alone."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from lacd.ingest import secrets
from lacd.ingest.lessons import LineRejected, parse_line
from lacd.ingest.secrets import KINDS, Finding, Scrubber, SecretsConfigError
from lacd.samples import generate_lines
from secrets_corpus import corpus, leaked

FIXTURE = Path(__file__).resolve().parents[2] / "shared/fixtures/local-ai-coder/agent_interactions.jsonl"


@pytest.fixture(scope="module")
def scrubber() -> Scrubber:
    return Scrubber()


@pytest.fixture(scope="module")
def planted():
    return corpus(seed=0, rounds=2)


def scrub(scrubber: Scrubber, line: str):
    return scrubber.scrub_lesson(line, parse_line(line).messages)


def everything(result) -> str:
    """Every byte the lead would store for a lesson: the raw line and the canonical conversation."""
    return result.raw + json.dumps(result.messages) + json.dumps(result.messages, ensure_ascii=False)


# -- the planted corpus ---------------------------------------------------------------------------


def test_every_planted_secret_is_found_with_its_kind_and_gone(scrubber, planted):
    lines, plants = planted
    results = [scrub(scrubber, line) for line in lines]
    for p in plants:
        result = results[p.line]
        assert not leaked(p.secret, everything(result)), f"line {p.line}: a {p.kind} survived"
        assert p.kind in result.counts(), f"line {p.line}: expected a {p.kind} finding, got {result.counts()}"
        assert f"<redacted:{p.kind}>" in everything(result)
    assert {p.kind for p in plants} == set(KINDS)  # the corpus covers every kind


def test_the_corpus_is_the_same_for_a_seed_and_holds_no_secret_twice():
    assert corpus(3) == corpus(3)
    lines, plants = corpus(4)
    assert corpus(5)[0] != lines
    assert len({p.secret for p in plants}) == len({(p.secret, p.line) for p in plants})


def test_the_raw_line_stays_valid_json_of_the_same_shape(scrubber, planted):
    lines, _ = planted
    for line in lines:
        result = scrub(scrubber, line)
        before, after = json.loads(line), json.loads(result.raw)
        assert type(before) is type(after) and set(before) == set(after)
        assert parse_line(result.raw).format == parse_line(line).format


def test_findings_name_kind_field_and_turn_never_the_secret(scrubber, planted):
    lines, plants = planted
    for i, line in enumerate(lines):
        result = scrub(scrubber, line)
        secrets_here = [p.secret for p in plants if p.line == i]
        for f in result.findings:
            assert f.kind in KINDS and isinstance(f.turn, int)
            assert not any(s in repr(f) for s in secrets_here)
            if f.field != "raw":
                assert result.messages[f.turn]["role"] == f.field or f.field == "tool_calls"


def test_placeholders_replace_exactly_the_secret(scrubber):
    text = "connect with postgres://app:Xy7#kQ2m9@db:5432/shop then run mysql -u root -pR00t!Pass shop"
    out, kinds = scrubber.scrub_text(text)
    assert out == ("connect with postgres://app:<redacted:password-in-url>@db:5432/shop "
                   "then run mysql -u root -p<redacted:password> shop")
    assert sorted(kinds) == ["password", "password-in-url"]


def test_a_value_found_once_is_redacted_everywhere_in_the_lesson(scrubber):
    messages = [
        {"role": "user", "content": "set DB_PASSWORD=Tr0ub4dor&3x in the env"},
        {"role": "assistant", "content": "Done. Remember that Tr0ub4dor&3x is now in your shell history."},
    ]
    result = scrubber.scrub_messages(messages)
    assert "Tr0ub4dor&3x" not in json.dumps(result.messages)
    assert result.findings == [Finding("password", "user", 0), Finding("password", "assistant", 1)]


# -- secret files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("call", [
    "read_file('.env')", "read_file('config/.env.local')", "read_file('deploy/prod.env')",
    "run_shell_command('cat ~/.ssh/id_rsa')", "run_shell_command('cat ~/.ssh/id_ed25519 | head')",
    "read_file('certs/server.pem')", "read_file('/home/dana/.netrc')", "run_shell_command('cat ~/.aws/credentials')",
    "run_shell_command('printenv')", "run_shell_command('env | sort')", "search_file_content('.env', 'KEY')",
])
def test_a_tool_output_of_a_secret_file_is_replaced_whole(scrubber, call):
    messages = [
        {"role": "user", "content": "show it"},
        {"role": "assistant", "content": f"<tool_code>\n{call}\n</tool_code>"},
        {"role": "tool", "content": "<tool_output>NAME=value\nOTHER=thing</tool_output>"},
        {"role": "assistant", "content": "Here it is."},
    ]
    result = scrubber.scrub_messages(messages)
    assert result.messages[2]["content"] == "<tool_output><redacted:secret-file></tool_output>"
    assert result.findings == [Finding("secret-file", "tool", 2)]
    assert result.messages[1] is messages[1] and messages[2]["content"].startswith("<tool_output>NAME")


@pytest.mark.parametrize("call", [
    "read_file('src/env.js')", "list_directory('.')", "list_directory('.', '.env')", "read_file('id_rsa.pub')",
    "run_shell_command('grep -rn process.env src')", "run_shell_command('python -m venv .venv')",
    "get_file_metadata('.env')",
])
def test_other_tool_outputs_are_not_secret_files(scrubber, call):
    messages = [
        {"role": "user", "content": "show it"},
        {"role": "assistant", "content": f"<tool_code>\n{call}\n</tool_code>"},
        {"role": "tool", "content": "<tool_output>.env\nsrc/\npackage.json</tool_output>"},
    ]
    result = scrubber.scrub_messages(messages)
    assert result.findings == [] and result.messages == messages


def test_error_wrappers_are_kept_and_calls_pair_in_order(scrubber):
    messages = [
        {"role": "user", "content": "read both"},
        {"role": "assistant", "content": "<tool_code>\nread_file('README.md')\n</tool_code>\n<tool_code>\nread_file('.env')\n</tool_code>"},
        {"role": "tool", "content": "<tool_output># Shop\nA small shop.</tool_output>"},
        {"role": "tool", "content": "<tool_output_error>EACCES: permission denied, open '.env'</tool_output_error>"},
    ]
    result = scrubber.scrub_messages(messages)
    assert result.messages[2] is messages[2]
    assert result.messages[3]["content"] == "<tool_output_error><redacted:secret-file></tool_output_error>"


def test_grep_results_inside_secret_files_lose_their_content(scrubber):
    output = "<tool_output>./.env:4:STRIPE_KEY=pk_9f8e7d6c5b4a\nsrc/pay.js:3:const key = process.env.STRIPE_KEY;</tool_output>"
    messages = [{"role": "user", "content": "find STRIPE_KEY"},
                {"role": "assistant", "content": "<tool_code>\nrun_shell_command('grep -rn STRIPE_KEY .')\n</tool_code>"},
                {"role": "tool", "content": output}]
    content = scrubber.scrub_messages(messages).messages[2]["content"]
    assert content == ("<tool_output>./.env:4:<redacted:secret-file>\n"
                       "src/pay.js:3:const key = process.env.STRIPE_KEY;</tool_output>")


def test_secret_paths_are_configurable(scrubber):
    custom = Scrubber(secret_paths=("*.secret.json",))
    assert custom.is_secret_path("config/db.secret.json") and not custom.is_secret_path(".env")
    assert scrubber.is_secret_path("a/b/.env") and not scrubber.is_secret_path("process.env")


# -- actions and settings -----------------------------------------------------------------------------


def test_exclude_action_marks_the_lesson_and_still_redacts(planted):
    lines, plants = planted
    key_line = next(p.line for p in plants if p.kind == "private-key")
    strict = Scrubber(actions={"private-key": "exclude"})
    result = scrub(strict, lines[key_line])
    assert result.exclude and not leaked(next(p.secret for p in plants if p.line == key_line), everything(result))
    others = [i for i in range(len(lines)) if not any(p.line == i and p.kind == "private-key" for p in plants)]
    assert not any(scrub(strict, lines[i]).exclude for i in others)
    assert not scrub(Scrubber(), lines[key_line]).exclude


def test_bad_settings_are_refused_with_the_setting_named():
    with pytest.raises(SecretsConfigError, match="unknown kind 'passwords'"):
        Scrubber(actions={"passwords": "exclude"})
    with pytest.raises(SecretsConfigError, match="expected redact or exclude"):
        Scrubber(actions={"jwt": "drop"})
    with pytest.raises(SecretsConfigError, match="entropy"):
        Scrubber(entropy_limit=9)


# -- text, prefixes, other shapes -------------------------------------------------------------------------


def test_scrub_text_on_plain_text_and_on_a_cut_reject_prefix(scrubber):
    token = "ghp_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5"
    line = json.dumps({"user_prompt": f"push with {token} please", "ai_responses": ["ok"]})[:80]
    out, kinds = scrubber.scrub_text(line)  # not JSON any more: scanned as text
    assert token not in out and kinds == ["github-token"]
    cut, kinds = scrubber.scrub_prefix(f"{'x' * 30} {token} and more", 40)
    assert len(cut) == 40 and "ghp_" not in cut and kinds == ["github-token"]
    assert scrubber.scrub_text("nothing to see here") == ("nothing to see here", [])


def test_a_truncated_private_key_is_redacted_to_the_end(scrubber):
    lines, plants = corpus(seed=1)
    key = next(p.secret for p in plants if p.kind == "private-key")
    text = "here is my key:\n" + key[: len(key) // 2]
    out, kinds = scrubber.scrub_text(text)
    assert out == "here is my key:\n<redacted:private-key>" and kinds == ["private-key"]


def test_openai_tool_call_arguments_are_scanned(scrubber):
    messages = [{"role": "user", "content": "reset it"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"name": "reset_account", "arguments": {"user": "admin", "accessToken": "q8Xv2LmN0pRz"}}]},
                {"role": "tool", "content": "ok"}]
    result = scrubber.scrub_messages(messages)
    assert result.messages[1]["tool_calls"][0]["arguments"] == {"user": "admin", "accessToken": "<redacted:secret-assignment>"}
    assert result.findings == [Finding("secret-assignment", "tool_calls", 1)]
    assert messages[1]["tool_calls"][0]["arguments"]["accessToken"] == "q8Xv2LmN0pRz"
    raw = json.dumps({"messages": [messages[0], {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                      "function": {"name": "reset_account", "arguments": json.dumps(messages[1]["tool_calls"][0]["arguments"])}}]},
                      messages[2]]})
    lesson = scrub(scrubber, raw)
    assert "q8Xv2LmN0pRz" not in everything(lesson) and lesson.counts() == {"secret-assignment": 1}


@pytest.mark.parametrize("text", [
    'password = get_password()', 'if password == "": return', 'password = None', 'self.password = password',
    '--max-tokens 2048', 'use the --password option', 'https://user:password@host.example.com/',
    'proxy = "http://{user}:{token}@proxy:3128"', 'TOKENIZERS_PARALLELISM=false', 'PRIMARY_KEY=id',
    'const key = process.env.API_KEY;', 'headers["Authorization"] = f"Bearer {token}"',
    "_b32alphabet = b'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567'", 'status = "not_supported"  # password_last_used',
    '"integrity": "sha512-Zk9xW1vQ8bL4nR2tY6uP0sA3dF5gH7jK9lM1nB3vC5xZ7qW9eR1tY3uI5oP7aS9dF1gH3jK5lZ7xC9vB1nM3qw=="',
    "GATTACAACCATGCGCGATATAGCGCGATTATAT" * 2, "the -----BEGIN RSA PRIVATE KEY----- marker starts a key",
    'WWW-Authenticate: Basic realm="admin"', "a basic example of bearer tokens", 'auth = "Basic " + b64encode(creds)',
    'headers = {"Authorization": f"Bearer {self.token}"}', "Authorization: Bearer $GITHUB_TOKEN",
    'curl -H "X-Api-Key: <your key>" https://api.example.com', "authorization = base64.decodebytes(authorization)",
    "docker login -u dana --password-stdin < ~/pw.txt", "docker login -u dana -p", "mongosh -p --quiet",
    "the aws cli reads ~/.aws/config; commit 3f2a1c9e8d7b6a5f4e3d2c1b0a9f8e7d6c5b4a39 fixed it",
    "hf_hub_download(repo_id, filename)", "the laws of thermodynamics: ZmFzdGFwaS9yb3V0aW5nL3Jlc3BvbnNlcy5weQ",
    r"caf\u00e9 and na\u00efve are escaped, https:\/\/example.com\/docs too",
])
def test_ordinary_code_and_prose_is_left_alone(scrubber, text):
    assert scrubber.scrub_text(text) == (text, [])


# -- no false positives on ordinary lines ---------------------------------------------------------------


@pytest.mark.skipif(not FIXTURE.exists(), reason="shared fixtures absent")
def test_no_finding_on_the_real_fixture_lines(scrubber):
    lines = [line for line in FIXTURE.read_text(encoding="utf-8").splitlines() if line.strip()]
    found = {}
    for i, line in enumerate(lines):
        try:
            result = scrub(scrubber, line)
        except LineRejected:
            continue
        if result.findings:
            found[i] = result.counts()
        assert (result.raw == line) == (not result.findings)
    assert found == {}


def test_no_finding_on_generated_ordinary_lines(scrubber):
    lines = list(generate_lines(600, seed=21, noise=0.2)) + list(generate_lines(600, seed=22, version="v2", chat=0.3))
    clean = 0
    for line in lines:
        try:
            messages = parse_line(line).messages
        except LineRejected:
            continue
        result = scrubber.scrub_lesson(line, messages)
        assert result.findings == [], result.counts()
        assert result.raw is line and result.messages is messages  # untouched, not copied
        clean += 1
    assert clean > 1000


def test_stdlib_code_read_by_the_agent_is_left_alone(scrubber):
    """A documented tiny number: 1 finding in these 15 modules (14,941 lines): the example password
    of a docstring in urllib/request.py, ``add_password(..., passwd='...')``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    names = ["os.py", "subprocess.py", "smtplib.py", "ftplib.py", "imaplib.py", "netrc.py", "getpass.py",
             "hashlib.py", "hmac.py", "ssl.py", "urllib/request.py", "http/client.py", "secrets.py",
             "shlex.py", "base64.py"]
    kinds: dict[str, int] = {}
    for name in names:
        text = (root / name).read_text(encoding="utf-8").splitlines()
        for i in range(0, len(text), 60):
            chunk = "\n".join(text[i:i + 60])
            line = json.dumps({"user_prompt": f"show {name}", "ai_responses": [f"<tool_code>\nread_file('{name}')\n</tool_code>"],
                               "tool_executions": [{"tool_call": f"read_file('{name}')", "tool_output": f"<tool_output>{chunk}</tool_output>"}]})
            for kind, n in scrub(scrubber, line).counts().items():
                kinds[kind] = kinds.get(kind, 0) + n
    assert sum(kinds.values()) <= 1, kinds


# -- the gate ------------------------------------------------------------------------------------------------


def test_the_pure_python_gate_gives_the_same_answers(planted):
    lines, _ = planted
    fast, slow = Scrubber(), Scrubber(use_automaton=False)
    ordinary = list(generate_lines(300, seed=5, noise=0.2))
    for line in lines + ordinary:
        assert fast.gate(line) == slow.gate(line)
        try:
            messages = parse_line(line).messages
        except LineRejected:
            continue
        assert fast.scrub_lesson(line, messages) == slow.scrub_lesson(line, messages)


def test_the_gate_opens_for_every_planted_line_and_rarely_otherwise(scrubber, planted):
    lines, _ = planted
    assert all(scrubber.gate(line) for line in lines)
    ordinary = list(generate_lines(1000, seed=9, noise=0.1))
    assert sum(1 for line in ordinary if scrubber.gate(line)) < 0.1 * len(ordinary)


def test_without_the_automaton_module_the_scrubber_still_works(monkeypatch, planted):
    monkeypatch.setattr(secrets, "ahocorasick", None)
    lines, plants = planted
    plain = Scrubber()
    for p in plants:
        assert not leaked(p.secret, everything(scrub(plain, lines[p.line])))


NEW_SHAPES = {  # issue 11: each alone, in prose, with no keyword next to it
    "anthropic-key": "curl -H 'x-api-key: sk-ant-api03-" + "Ab3_De5-Fg7Hj9Kl1Mn3Pq5Rs7Tu9Vw1Xy3Za5" * 2 + "Qq1Ww2Ee3Rr4Tt5AA'",
    "huggingface-token": "my token is hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh" + " thanks",
    "google-api-key": "the key AIza" + "Sy9Qk2Lm4Np6Rt8Vx0Zb1Dc3Fe5Gh7Jk9Lm" + " works",
    "aws-access-key": "our AWS secret key is " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCYq3x8Zt2LkQ" + " now",
    "github-token": "ghp_" + "Ab3De5Fg7Hj9Kl1Mn3Pq5Rs7Tu9Vw1Xy3Za5",
    "openai-key": "export it: sk-proj-" + "Ab3De5Fg7Hj9Kl1Mn3Pq5Rs7Tu9Vw1Xy3Za5" * 2,
    "gitlab-token": "token glpat-" + "Ab3De5Fg7Hj9Kl1Mn3Pq",
    "npm-token": "npm_" + "Ab3De5Fg7Hj9Kl1Mn3Pq5Rs7Tu9Vw1Xy3Za5",
    "pypi-token": "pypi-AgEIcHlwaS5vcmc" + "Ab3De5Fg7Hj9Kl1Mn3Pq5Rs7Tu9Vw1Xy3Za5" * 3,
    "slack-token": "xoxp-12345678901-12345678901-1234567890123-" + "0a1b2c3d4e5f60718293a4b5c6d7e8f9",
    "stripe-key": "sk_live_" + "Ab3De5Fg7Hj9Kl1Mn3Pq5Rs7Tu9Vw1Xy3Za5" * 2,
    "sendgrid-key": "SG." + "Ab3De5Fg7Hj9Kl1Mn3Pq5R" + "." + "Ab3De5Fg7Hj9Kl1Mn3Pq5Rs7Tu9Vw1Xy3Za5Ab3De5F",
    "twilio-key": "Twilio auth token 0a1b2c3d4e5f60718293a4b5c6d7e8f9",
    "azure-storage-key": "AccountName=x;AccountKey=" + "Ab3De5Fg7Hj9Kl1Mn3Pq5Rs7Tu9Vw1Xy3Za5/+" * 2 + "Ab3De5Fg7H==",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NSJ9.Ab3De5Fg7Hj9Kl1Mn3Pq5Rs7Tu9Vw1Xy3Za5",
    "auth-header": "curl -H 'Authorization: Basic ZGFuYTpQdzEyMzQ1eA==' https://ci.example.com",
    "password": "docker login -u dana -p Pw12345x registry.example.com",
}


@pytest.mark.parametrize("kind", sorted(NEW_SHAPES))
@pytest.mark.parametrize("escape", [False, True])
def test_each_shape_is_found_alone_also_when_the_writer_escaped_it(scrubber, kind, escape):
    """Each shape in a prompt and in a tool output; ``escape``: its first character written as a
    JSON \\u escape in the raw line (the line decodes to the same lesson). Gone from the raw line
    and the conversation, found with its kind."""
    text = NEW_SHAPES[kind]
    for line in (json.dumps({"user_prompt": f"look: {text}", "ai_responses": ["ok"]}),
                 json.dumps({"user_prompt": "show notes.txt", "ai_responses": ["<tool_code>\nread_file('notes.txt')\n</tool_code>"],
                             "tool_executions": [{"tool_call": "read_file('notes.txt')", "tool_output": f"<tool_output>{text}</tool_output>"}]})):
        if escape:
            line = line.replace(text, "\\u%04x" % ord(text[0]) + text[1:])
            assert text not in line and parse_line(line).messages == parse_line(line.replace("\\u%04x" % ord(text[0]), text[0])).messages
        result = scrub(scrubber, line)
        assert kind in result.counts(), (kind, result.counts())
        kept = everything(result)
        assert f"<redacted:{kind}>" in kept and "<redacted:" in result.raw
        assert not any(part in kept for part in ("Ab3De5Fg7Hj9Kl1", "AbCdEfGhIjKl", "Sy9Qk2Lm4Np6", "wJalrXUtnFEMI",
                                                  "0a1b2c3d4e5f6071", "ZGFuYTpQdzEyMzQ1eA", "Pw12345x", "Zb1Dc3Fe5Gh7"))


@pytest.mark.parametrize("prose", ["the secret access key is {}", "AWS: {} (rotated yesterday)"])
def test_an_aws_secret_key_in_prose_needs_only_a_word_near_it(scrubber, prose):
    key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYq3x8Zt2LkQ"
    out, kinds = scrubber.scrub_text(prose.format(key))
    assert kinds == ["aws-access-key"] and key not in out
    assert scrubber.scrub_text(f"the build id is {key}") == (f"the build id is {key}", [])  # no word: not taken


def test_json_escapes_alone_do_not_open_the_gate(scrubber):
    line = json.dumps({"user_prompt": "caf\u00e9 \u2014 na\u00efve", "ai_responses": ["https://example.com/docs"]})
    assert "\\u00e9" in line and scrubber.gate(line) == set()
    assert scrubber.gate(line.replace("/", "\\/")) == set()


def test_a_reject_prefix_is_scanned_as_decoded(scrubber):
    token = "ghp_" + "Ab3De5Fg7Hj9Kl1Mn3Pq5Rs7Tu9Vw1Xy3Za5"
    broken = '{"user_prompt": "push with \\u0067' + token[1:] + ' and more", oops'
    prefix, kinds = scrubber.scrub_prefix(broken, 200)
    assert kinds == ["github-token"] and token[1:] not in prefix and "<redacted:github-token>" in prefix


SNIPPETS = [
    "GH_TOKEN=abc123def456", "DB_PASSWORD=hunter22x", "export NPM_TOKEN=abc123def456", "--password=Pw12345x",
    "mysql -uroot -pPw12345x db", 'password = "Pw12345x"', "api_key: 'Zx81kQ0pL2'", "AKIA" + "Q7Z2K4M6N8P2R4T6",
    "ghp_" + "Ab3De5Fg7Hj9Kl1Mn3Pq5Rs7Tu9Vw1Xy3Za5", "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
    "postgres://u:Pw12345x@h/db", "curl -u bob:Pw12345x https://x", 'SIGNING = "' + "Zk9xW1vQ8bL4nR2tY6uP0sA3dF5gH7jK9lM1nB3v" + '"',
    "sshpass -p Pw12345x ssh host", "redis-cli -a Pw12345x ping", "docker login -u a -p Pw12345x r.io",
    "echo Pw12345x | docker login -u a --password-stdin r.io", "mongosh -u a -p Pw12345x", "sqlcmd -U sa -P Pw12345x",
    "ldapsearch -x -w Pw12345x", "htpasswd -bc f dana Pw12345x", "openssl rsa -passin pass:Pw12345x",
    "Authorization: Basic dTpQdzEyMzQ1eA==", "Authorization: Bearer abc123def456ghi789", "X-Api-Key: abc123def456",
    "redis://:Pw12345x@cache:6379", "aws secret abc123def456" + "Zk9xW1vQ8bL4nR2tY6uP0sA3Qx9z",
]


@pytest.mark.parametrize("snippet", SNIPPETS)
@pytest.mark.parametrize("before", ["", "\n", "x ", "\t", "{\n  "])
def test_the_raw_line_gate_is_sound_wherever_the_secret_sits(scrubber, snippet, before):
    """Whatever a message holds around a secret (escaped newlines, quotes, tabs in the raw JSON),
    the gate on the raw line opens and the lesson comes out clean."""
    for where in ("prompt", "output"):
        text = before + snippet + "\nmore"
        if where == "prompt":
            line = json.dumps({"user_prompt": text, "ai_responses": ["ok"]})
        else:
            line = json.dumps({"user_prompt": "show app.conf", "ai_responses": ["<tool_code>\nread_file('app.conf')\n</tool_code>"],
                               "tool_executions": [{"tool_call": "read_file('app.conf')", "tool_output": f"<tool_output>{text}</tool_output>"}]})
        messages = parse_line(line).messages
        assert scrubber.scrub_messages(messages).findings, (snippet, where)
        result = scrubber.scrub_lesson(line, messages)
        assert result.findings and "Pw12345x" not in everything(result) and "abc123def456" not in everything(result)
        assert "<redacted:" in result.raw


def test_a_short_secret_found_in_the_messages_is_gone_from_the_raw_line_too(scrubber):
    messages = [{"role": "user", "content": "log in"},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                    "name": "login", "arguments": json.dumps({"user": "dana", "apiToken": "zq7w"})}}]},
                {"role": "tool", "content": "welcome"}]
    line = json.dumps({"messages": messages})
    result = scrub(scrubber, line)
    assert "zq7w" not in everything(result) and result.counts() == {"secret-assignment": 1}
