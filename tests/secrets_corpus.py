"""Realistic secrets planted in local-ai-coder log lines: the proof corpus for lacd.ingest.secrets.

``corpus(seed)`` returns ``(lines, planted)``: JSON log lines in the agent's formats (v1
``user_prompt``, v2 ``user_message``, and OpenAI ``messages``) and, for each planted secret, its
value, the line it is in, and the finding kind that must be recorded for it ("secret-file" when it
sits in a file that is secret by nature). Values are fake but well-formed (right prefixes,
alphabets and lengths, JWTs that decode, PEM blocks with base64 bodies), drawn from a seeded
random: the same seed gives the same corpus, and no real key is ever used.
"""

from __future__ import annotations

import base64
import json
import random
import string
from dataclasses import dataclass
from typing import Callable

B32 = string.ascii_uppercase + "234567"
ALNUM = string.ascii_letters + string.digits
B64 = ALNUM + "+/"


@dataclass(frozen=True)
class Planted:
    """One planted secret: its value, the index of its line, and the kind that must be found."""

    secret: str
    line: int
    kind: str


class _Fake:
    """Well-formed fake secrets from a seeded random."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def chars(self, alphabet: str, n: int) -> str:
        return "".join(self.r.choice(alphabet) for _ in range(n))

    def password(self) -> str:
        """Ten to fourteen characters with upper, lower, digits and a symbol (no quotes or spaces)."""
        core = self.chars(string.ascii_lowercase, 4) + self.chars(string.ascii_uppercase, 3) + self.chars(string.digits, 3)
        return "".join(self.r.sample(core, len(core))) + self.r.choice("!#%^*_") + self.chars(ALNUM, self.r.randint(0, 3))

    def aws_key_id(self) -> str:
        return "AKIA" + self.chars(B32, 16)

    def aws_secret(self) -> str:
        return self.chars(B64, 40)

    def github_classic(self) -> str:
        return "ghp_" + self.chars(ALNUM, 36)

    def github_fine(self) -> str:
        return "github_pat_" + self.chars(ALNUM, 22) + "_" + self.chars(ALNUM, 59)

    def slack_bot(self) -> str:
        return f"xoxb-{self.chars(string.digits, 12)}-{self.chars(string.digits, 13)}-{self.chars(ALNUM, 24)}"

    def slack_webhook(self) -> str:
        return (f"https://hooks.slack.com/services/T{self.chars(B32, 8)}/B{self.chars(B32, 10)}/"
                f"{self.chars(ALNUM, 24)}")

    def stripe(self) -> str:
        return "sk_live_" + self.chars(ALNUM, 24)

    def jwt(self) -> str:
        def seg(obj: dict) -> str:
            return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode().rstrip("=")
        payload = {"sub": str(self.r.randint(10**5, 10**6)), "name": "Dana Reyes", "iat": 1_700_000_000 + self.r.randint(0, 10**6)}
        return f"{seg({'alg': 'HS256', 'typ': 'JWT'})}.{seg(payload)}.{self.chars(ALNUM + '-_', 43)}"

    def pem(self, label: str = "RSA PRIVATE KEY", lines: int = 12) -> str:
        body = [self.chars(B64, 64) for _ in range(lines)] + [self.chars(B64, 24) + "=="]
        return "\n".join([f"-----BEGIN {label}-----", *body, f"-----END {label}-----"])

    def salt(self) -> str:
        """A random base64 string long enough to be clearly high-entropy."""
        return self.chars(B64, 48)


def _v1(prompt: str, replies: list[str], executions: list[tuple[str, str]]) -> str:
    return json.dumps({"user_prompt": prompt, "ai_responses": replies,
                       "tool_executions": [{"tool_call": c, "tool_output": o} for c, o in executions]})


def _v2(prompt: str, replies: list[str], executions: list[tuple[str, str]]) -> str:
    return json.dumps({"user_message": prompt, "ai_responses": replies,
                       "tool_executions": [{"tool_call": c, "tool_output": o} for c, o in executions]})


def _call(code: str) -> str:
    return f"<tool_code>\n{code}\n</tool_code>"


def _out(text: str) -> str:
    return f"<tool_output>{text}</tool_output>"


def _aws_in_code(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    key_id, secret = f.aws_key_id(), f.aws_secret()
    code = ("import boto3\n\n\ndef client():\n"
            f"    return boto3.client(\"s3\", aws_access_key_id=\"{key_id}\",\n"
            f"                        aws_secret_access_key=\"{secret}\")\n")
    line = _v1("why does deploy.py fail on the upload step?",
               [_call("read_file('deploy.py')"),
                f"`client()` builds the S3 client with a hard-coded key ({key_id}); move it to the environment."],
               [("read_file('deploy.py')", _out(code))])
    return line, [(key_id, "aws-access-key"), (secret, "aws-access-key")]


def _aws_inline_env(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    key_id, secret = f.aws_key_id(), f.aws_secret()
    command = f"AWS_ACCESS_KEY_ID={key_id} AWS_SECRET_ACCESS_KEY={secret} npm run deploy"
    line = _v1(f"run the deploy with {command}",
               [_call(f"run_shell_command('{command}')"), "The deploy finished: 14 files uploaded."],
               [(f"run_shell_command('{command}')", _out("> shop@1.4.0 deploy\n> node scripts/deploy.js\nuploaded 14 files"))])
    return line, [(key_id, "aws-access-key"), (secret, "aws-access-key")]


def _github_push(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    token = f.github_classic()
    command = f"git push https://{token}@github.com/acme/shop.git main"
    line = _v1(f"push main using my token {token}",
               [_call(f"run_shell_command('{command}')"), "Pushed `main` to github.com/acme/shop."],
               [(f"run_shell_command('{command}')", _out("To github.com:acme/shop.git\n   3f2a1c9..8e7d6b5  main -> main"))])
    return line, [(token, "github-token")]


def _github_pat_workflow(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    token = f.github_fine()
    workflow = ("name: release\non:\n  push:\n    tags: ['v*']\njobs:\n  publish:\n    runs-on: ubuntu-latest\n"
                f"    env:\n      GH_TOKEN: {token}\n    steps:\n      - uses: actions/checkout@v4\n")
    line = _v2("check the release workflow",
               [_call("read_file('.github/workflows/release.yml')")],
               [("read_file('.github/workflows/release.yml')", _out(workflow))])
    return line, [(token, "github-token")]


def _slack_config(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    bot, hook = f.slack_bot(), f.slack_webhook()
    config = json.dumps({"slack": {"botToken": bot, "channel": "#deploys", "webhook": hook}}, indent=2)
    line = _v1("where do the deploy notifications go?",
               [_call("read_file('config/notify.json')"), "They go to #deploys through the Slack bot configured in config/notify.json."],
               [("read_file('config/notify.json')", _out(config))])
    return line, [(bot, "slack-token"), (hook, "slack-token")]


def _jwt_curl(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    token = f.jwt()
    command = f"curl -s -H 'Authorization: Bearer {token}' https://api.example.com/v1/orders"
    line = _v1(f"this request returns 401, why? {command}",
               [_call(f"run_shell_command(\"{command}\")"),
                f"The API rejects the token: `{token}` expired (its iat is old). Log in again to get a new one."],
               [(f"run_shell_command(\"{command}\")", _out('{"error":"token_expired"}'))])
    return line, [(token, "jwt")]


def _pem_in_prompt(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    key = f.pem()
    line = _v1(f"ssh says 'invalid format' for this key, what is wrong?\n{key}",
               ["The key looks like a PEM RSA key; check that the file ends with a newline and has mode 600."], [])
    return line, [(key, "private-key")]


def _pem_written(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    key = f.pem("PRIVATE KEY", 8)
    escaped = key.replace("\n", "\\n")
    call = f"write_file('certs/dev-server.txt', '{escaped}')"
    line = _v2("save the dev server key I pasted earlier into certs/dev-server.txt",
               [_call(call)], [(call, _out("File written: certs/dev-server.txt"))])
    return line, [(key, "private-key")]


def _cat_id_rsa(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    key = f.pem("OPENSSH PRIVATE KEY", 6)
    line = _v1("show me my ssh key",
               [_call("run_shell_command('cat ~/.ssh/id_rsa')"), "That is your private key; never share it."],
               [("run_shell_command('cat ~/.ssh/id_rsa')", _out(key))])
    return line, [(key, "secret-file")]


def _read_env(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    db, session, stripe = f.password(), f.salt(), f.stripe()
    env = (f"NODE_ENV=production\nPORT=3000\nDB_PASSWORD={db}\nSESSION_SECRET={session}\n"
           f"STRIPE_SECRET_KEY={stripe}\n")
    line = _v1("what database password does the app use?",
               [_call("read_file('.env')"), f"The app connects with DB_PASSWORD={db}; rotate it if it was shared."],
               [("read_file('.env')", _out(env))])
    return line, [(db, "secret-file"), (session, "secret-file"), (stripe, "secret-file"), (db, "password")]


def _read_env_production(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    token, password = f.github_classic(), f.password()
    env = f"API_URL=https://api.example.com\nGITHUB_TOKEN={token}\nADMIN_PASSWORD={password}\n"
    line = _v2("read .env.production", [_call("read_file('.env.production')")],
               [("read_file('.env.production')", _out(env))])
    return line, [(token, "secret-file"), (password, "secret-file")]


def _mysqldump(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    password = f.password()
    command = f"mysqldump -u root -p{password} shop > shop.sql"
    line = _v1("dump the shop database",
               [_call(f"run_shell_command('{command}')"),
                "mysqldump was refused: the password for root is wrong (error 1045)."],
               [(f"run_shell_command('{command}')",
                 "<tool_output_error>mysqldump: Got error: 1045: Access denied for user 'root'@'localhost' "
                 "(using password: YES)</tool_output_error>")])
    return line, [(password, "password")]


def _password_flags(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    mysql, redis, docker = f.password(), f.password(), f.password()
    commands = [f"mysql --user=app --password={mysql} -e 'SELECT 1' shop",
                f"redis-cli -h cache -a {redis} ping",
                f"docker login -u deploybot --password {docker} registry.example.com"]
    calls = [f"run_shell_command(\"{c}\")" for c in commands]
    line = _v1("check that mysql, redis and the registry accept our credentials",
               [_call(calls[0]) + "\n" + _call(calls[1]) + "\n" + _call(calls[2]), "All three accepted the credentials."],
               [(calls[0], _out("1\n1")), (calls[1], _out("PONG")), (calls[2], _out("Login Succeeded"))])
    return line, [(mysql, "password"), (redis, "password"), (docker, "password")]


def _url_passwords(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    pg, my = f.password().replace("#", "x").replace("%", "y"), f.password().replace("#", "x").replace("%", "y")
    compose = ("services:\n  app:\n    image: shop:latest\n    environment:\n"
               f"      DATABASE_URL: \"mysql://root:{my}@mysql:3306/app\"\n")
    line = _v1(f"connect to postgres://app:{pg}@db.internal:5432/shop and compare with the compose database",
               [_call("read_file('docker-compose.yml')"), "Compose points the app at the mysql service, not at db.internal."],
               [("read_file('docker-compose.yml')", _out(compose))])
    return line, [(pg, "password-in-url"), (my, "password-in-url")]


def _keywords_in_code(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    password, api = f.password(), f.chars(ALNUM, 32)
    code = ("module.exports = {\n  db: {\n    host: 'localhost',\n"
            f"    password: \"{password}\",\n  }},\n  mailer: {{ apiKey: \"{api}\" }},\n}};\n")
    line = _v2("review src/config.js", [_call("read_file('src/config.js')")],
               [("read_file('src/config.js')", _out(code))])
    return line, [(password, "password"), (api, "secret-assignment")]


def _entropy_and_stripe(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    salt, stripe = f.salt(), f.stripe()
    code = (f"const SIGNING_SALT = \"{salt}\";\n"
            f"stripe.api_key = \"{stripe}\";\n")
    line = _v1("what does src/pay.js configure?",
               [_call("read_file('src/pay.js')"), "It sets the signing salt and the Stripe key."],
               [("read_file('src/pay.js')", _out(code))])
    return line, [(salt, "high-entropy"), (stripe, "stripe-key")]


def _openai_tool_calls(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    ci, admin = f.password(), f.password()
    line = json.dumps({"messages": [
        {"role": "system", "content": "You are a coding agent."},
        {"role": "user", "content": "trigger the nightly job and reset the admin account"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "run_shell_command", "arguments": json.dumps(
                {"command": f"curl -u deploy:{ci} -X POST https://ci.example.com/job/nightly/build"})}},
            {"type": "function", "function": {"name": "reset_account", "arguments": json.dumps(
                {"user": "admin", "password": admin})}}]},
        {"role": "tool", "content": "201 Created"},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "The nightly job is queued and the admin password was reset."}]})
    return line, [(ci, "password"), (admin, "password")]


def _plan_step(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    password = f.password()
    plan = json.dumps({"plan": [{"tool": "run_shell_command", "args": [f"mysql -u root -p{password} -e 'show databases'"]}]})
    line = _v1("list the databases", [f"<plan>{plan}</plan>", "There are three databases: shop, audit, mysql."],
               [(f"run_shell_command(mysql -u root -p{password} -e 'show databases')", _out("shop\naudit\nmysql"))])
    return line, [(password, "password")]


def _printenv(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    token, key = f.github_classic(), f.aws_secret()
    env = f"HOME=/home/dana\nGITHUB_TOKEN={token}\nAWS_SECRET_ACCESS_KEY={key}\nSHELL=/bin/bash\n"
    line = _v1("which environment variables are set?", [_call("run_shell_command('printenv')"), "HOME, SHELL and two credentials."],
               [("run_shell_command('printenv')", _out(env))])
    return line, [(token, "secret-file"), (key, "secret-file")]


def _grep_finds_env(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    key = f.chars(ALNUM, 32)
    output = f"./.env:3:MAILER_API_KEY={key}\n./src/mailer.js:12:const key = process.env.MAILER_API_KEY;"
    line = _v2("where is MAILER_API_KEY used?", [_call("run_shell_command('grep -rn MAILER_API_KEY .')")],
               [("run_shell_command('grep -rn MAILER_API_KEY .')", _out(output))])
    return line, [(key, "secret-file")]


def _netrc_and_aws_credentials(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    machine, secret = f.password(), f.aws_secret()
    netrc = f"machine api.example.com\n  login dana\n  password {machine}\n"
    creds = f"[default]\naws_access_key_id = {f.aws_key_id()}\naws_secret_access_key = {secret}\n"
    line = _v1("show my netrc and aws credentials",
               [_call("read_file('~/.netrc')") + "\n" + _call("run_shell_command('cat ~/.aws/credentials')"), "Both files hold credentials."],
               [("read_file('~/.netrc')", _out(netrc)), ("run_shell_command('cat ~/.aws/credentials')", _out(creds))])
    return line, [(machine, "secret-file"), (secret, "secret-file")]


BUILDERS: tuple[Callable[[_Fake], tuple[str, list[tuple[str, str]]]], ...] = (
    _aws_in_code, _aws_inline_env, _github_push, _github_pat_workflow, _slack_config, _jwt_curl, _pem_in_prompt,
    _pem_written, _cat_id_rsa, _read_env, _read_env_production, _mysqldump, _password_flags, _url_passwords,
    _keywords_in_code, _entropy_and_stripe, _openai_tool_calls, _plan_step, _printenv, _grep_finds_env,
    _netrc_and_aws_credentials,
)


def corpus(seed: int = 0, rounds: int = 1) -> tuple[list[str], list[Planted]]:
    """Log lines with planted secrets (each builder ``rounds`` times) and what was planted where."""
    fake = _Fake(seed)
    lines: list[str] = []
    planted: list[Planted] = []
    for _ in range(rounds):
        for build in BUILDERS:
            line, secrets = build(fake)
            planted += [Planted(secret, len(lines), kind) for secret, kind in secrets]
            lines.append(line)
    return lines, planted


def leaked(secret: str, text: str) -> bool:
    """Does any part of ``secret`` that could identify it survive in ``text``? The secret itself, its
    JSON-escaped form, or (for multi-line secrets such as keys) any of its lines of 16+ characters."""
    forms = {secret, json.dumps(secret)[1:-1]}
    forms.update(part for part in secret.splitlines() if len(part) >= 16 and "-----" not in part)
    return any(form in text for form in forms)
