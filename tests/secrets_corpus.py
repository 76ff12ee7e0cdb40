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
URLSAFE = ALNUM + "-_"
HEX = "0123456789abcdef"


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

    # -- token formats recognised by their shape alone (issue 11) --

    def anthropic(self) -> str:
        return "sk-ant-api03-" + self.chars(URLSAFE, 93) + "AA"

    def huggingface(self) -> str:
        return "hf_" + self.chars(string.ascii_letters, 34)

    def google(self) -> str:
        return "AIza" + self.chars(URLSAFE, 35)

    def openai_project(self) -> str:
        return "sk-proj-" + self.chars(URLSAFE, 74) + "T3BlbkFJ" + self.chars(URLSAFE, 74)

    def gitlab(self) -> str:
        return "glpat-" + self.chars(URLSAFE, 20)

    def npm(self) -> str:
        return "npm_" + self.chars(ALNUM, 36)

    def pypi(self) -> str:
        return "pypi-AgEIcHlwaS5vcmc" + self.chars(URLSAFE, 120)

    def slack_user(self) -> str:
        return f"xoxp-{self.chars(string.digits, 11)}-{self.chars(string.digits, 11)}-{self.chars(string.digits, 13)}-{self.chars(HEX, 32)}"

    def stripe_long(self) -> str:
        return "sk_live_" + self.chars(ALNUM, 99)

    def sendgrid(self) -> str:
        return f"SG.{self.chars(URLSAFE, 22)}.{self.chars(URLSAFE, 43)}"

    def twilio_sid(self) -> str:
        return "SK" + self.chars(HEX, 32)

    def twilio_token(self) -> str:
        return self.chars(HEX, 32)

    def azure_account_key(self) -> str:
        return self.chars(B64, 86) + "=="

    def basic_auth(self, user: str) -> str:
        return base64.b64encode(f"{user}:{self.password()}".encode()).decode()


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


def _anthropic_curl_reply(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    key = f.anthropic()
    reply = ("You can call the Messages API directly:\n\n```sh\ncurl https://api.anthropic.com/v1/messages \\\n"
             f"  -H \"x-api-key: {key}\" \\\n  -H \"anthropic-version: 2023-06-01\" \\\n"
             "  -H \"content-type: application/json\" -d @request.json\n```")
    return _v1("how do I call Claude from the shell with the key in my notes?", [reply], []), [(key, "anthropic-key")]


def _tokens_in_prose(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    hf, google, secret = f.huggingface(), f.google(), f.aws_secret()
    prompt = (f"the model download fails with 401 although my Hugging Face token is {hf}. The maps widget uses "
              f"the key {google} and works. Also, the backup job should use the AWS secret key {secret} now.")
    line = _v2(prompt, ["A 401 from the Hub means the token lacks read access to that repository; create a read token."], [])
    return line, [(hf, "huggingface-token"), (google, "google-api-key"), (secret, "aws-access-key")]


def _json_escaped(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    """Secrets whose letters the writer escaped: ``\\u0067hp_...``, ``\\u0041Iza...``, and a URL
    with every slash written ``\\/`` (as PHP's json_encode does)."""
    token, google, password = f.github_classic(), f.google(), f.password().replace("#", "x").replace("%", "y")
    prompt = f"push with {token}, keep the maps key {google} and clone https://dana:{password}@git.example.com/acme/shop.git"
    line = _v1(prompt, ["Pushed and cloned."], [])
    line = line.replace(token, "\\u0067" + token[1:]).replace(google, "\\u0041" + google[1:]).replace("/", "\\/")
    return line, [(token, "github-token"), (google, "google-api-key"), (password, "password-in-url")]


def _registry_logins(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    short, long_, stdin, helm = f.password(), f.password(), f.password(), f.password()
    commands = [f"docker login -u deploybot -p {short} registry.example.com",
                f"podman login quay.io --username dana --password {long_}",
                f"echo {stdin} | docker login ghcr.io -u dana --password-stdin"]
    calls = [f"run_shell_command('{c}')" for c in commands]
    line = _v1("log in to our three registries", ["\n".join(_call(c) for c in calls),
                                                   f"All three logins succeeded. For the charts run `helm registry login "
                                                   f"charts.example.com --username bot --password {helm}`."],
               [(c, _out("Login Succeeded")) for c in calls])
    return line, [(short, "password"), (long_, "password"), (stdin, "password"), (helm, "password")]


def _auth_headers(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    basic, bearer, private = f.basic_auth("ci"), f.chars(ALNUM, 40), f.chars(URLSAFE, 20) + "7"
    verbose = ("*   Trying 10.0.0.7:443...\n> GET /api/json HTTP/1.1\n> Host: ci.example.com\n"
               f"> Authorization: Basic {basic}\n> User-Agent: curl/8.5.0\n> Accept: */*\n>\n< HTTP/1.1 403 Forbidden")
    call = "run_shell_command('curl -v --netrc https://ci.example.com/api/json')"
    line = _v1(f"the webhook sends 'Authorization: Bearer {bearer}' and gets 403; does the CI accept my netrc login?",
               [_call(call), "The CI rejects the netrc user (403); the webhook token is not the problem.",
                f"To test the GitLab API use: curl --header \"PRIVATE-TOKEN: {private}\" https://gitlab.example.com/api/v4/user"],
               [(call, _out(verbose))])
    return line, [(basic, "auth-header"), (bearer, "auth-header"), (private, "auth-header")]


def _tokens_in_written_code(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    openai, gitlab, pypi, npm = f.openai_project(), f.gitlab(), f.pypi(), f.npm()
    code = ("import openai\\nimport gitlab\\n\\n"
            f"openai.api_key = \"{openai}\"\\n"
            f"gl = gitlab.Gitlab(\"https://gitlab.example.com\", private_token=\"{gitlab}\")\\n"
            f"TWINE_ARGS = [\"--username\", \"__token__\", \"{pypi}\"]\\n"
            f"NPMRC = \"//registry.npmjs.org/:_authToken={npm}\"\\n")
    call = f"write_file('scripts/release.py', '{code}')"
    line = _v2("write scripts/release.py that publishes to PyPI and npm and tags the release on GitLab",
               [_call(call), "scripts/release.py is written."], [(call, _out("File written: scripts/release.py"))])
    return line, [(openai, "openai-key"), (gitlab, "gitlab-token"), (pypi, "pypi-token"), (npm, "npm-token")]


def _service_keys_in_output(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    slack, stripe, sendgrid, square = f.slack_user(), f.stripe_long(), f.sendgrid(), "sq0csp-" + f.chars(URLSAFE, 43)
    sid, token, account = f.twilio_sid(), f.twilio_token(), f.azure_account_key()
    bus, sig = f.chars(B64, 43) + "=", f.chars(ALNUM, 43) + "%3D"
    notes = ("# Production services\n\n"
             f"* Slack user token for the bot migration: {slack}\n"
             f"* Stripe: {stripe}\n"
             f"* SendGrid: {sendgrid}\n"
             f"* Square application secret: {square}\n"
             f"* Twilio (SMS alerts): key {sid}, auth token {token}\n"
             f"* Storage: DefaultEndpointsProtocol=https;AccountName=shopassets;AccountKey={account};EndpointSuffix=core.windows.net\n"
             f"* Queue: Endpoint=sb://shop.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey={bus}\n"
             f"* Export: https://shopassets.blob.core.windows.net/exports?sv=2022-11-02&ss=b&srt=co&sp=rl&se=2026-01-01T00:00:00Z&sig={sig}\n")
    line = _v1("what services does production use? see docs/ops-notes.md",
               [_call("read_file('docs/ops-notes.md')"), "Slack, Stripe, SendGrid, Twilio and Azure storage and queues."],
               [("read_file('docs/ops-notes.md')", _out(notes))])
    return line, [(slack, "slack-token"), (stripe, "stripe-key"), (sendgrid, "sendgrid-key"), (square, "square-token"),
                  (sid, "twilio-key"),
                  (token, "twilio-key"), (account, "azure-storage-key"), (bus, "azure-storage-key"), (sig, "azure-storage-key")]


def _keys_and_jwt_in_chat(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    key, jwt = f.pem("EC PRIVATE KEY", 3), f.jwt()
    line = json.dumps({"messages": [
        {"role": "user", "content": "decode the tls secret and check the session token"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "run_shell_command", "arguments": json.dumps({"command": "kubectl get secret tls -o jsonpath='{.data.tls-key}' | base64 -d"})}}]},
        {"role": "tool", "content": key},
        {"role": "assistant", "content": f"The key is an EC key. The session token {jwt} is a valid HS256 JWT."}]})
    return line, [(key, "private-key"), (jwt, "jwt")]


def _more_command_lines(f: _Fake) -> tuple[str, list[tuple[str, str]]]:
    mongo, ldap, pg, sql, htp, ssl, redis = (f.password().replace("#", "x").replace("%", "y") for _ in range(7))
    commands = [f"mongosh 'mongodb+srv://admin:{mongo}@cluster0.example.net/shop' --eval 'db.stats()'",
                f"ldapsearch -x -D cn=admin,dc=example,dc=com -w {ldap} -b dc=example,dc=com",
                f"PGPASSWORD={pg} psql -h db -U app -c 'select 1'",
                f"sqlcmd -S reports -U sa -P {sql} -Q 'SELECT 1'",
                f"htpasswd -b -c .htpasswd dana {htp}",
                f"openssl pkcs12 -export -in cert.pem -inkey key.pem -out bundle.p12 -passout pass:{ssl}"]
    messages = [{"role": "user", "content": "check every service's credentials"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "run_shell_command", "arguments": json.dumps({"command": c})}}
                    for c in commands]}]
    messages += [{"role": "tool", "content": "ok"} for _ in commands]
    messages += [{"role": "tool", "content": f"cache: redis://:{redis}@cache:6379/0 reachable"},
                 {"role": "assistant", "content": "Every service accepted its credentials."}]
    line = json.dumps({"messages": messages})
    return line, [(mongo, "password-in-url"), (ldap, "password"), (pg, "password"), (sql, "password"),
                  (htp, "password"), (ssl, "password"), (redis, "password-in-url")]


BUILDERS: tuple[Callable[[_Fake], tuple[str, list[tuple[str, str]]]], ...] = (
    _aws_in_code, _aws_inline_env, _github_push, _github_pat_workflow, _slack_config, _jwt_curl, _pem_in_prompt,
    _pem_written, _cat_id_rsa, _read_env, _read_env_production, _mysqldump, _password_flags, _url_passwords,
    _keywords_in_code, _entropy_and_stripe, _openai_tool_calls, _plan_step, _printenv, _grep_finds_env,
    _netrc_and_aws_credentials, _anthropic_curl_reply, _tokens_in_prose, _json_escaped, _registry_logins, _auth_headers,
    _tokens_in_written_code, _service_keys_in_output, _keys_and_jwt_in_chat, _more_command_lines,
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
