"""prepare's secret scan: ordinary instructions and code samples pass, every real key format is flagged.

The fake keys are made here from a seeded generator (the right prefix, charset and length), so no
real-looking secret sits in the repository.
"""

from __future__ import annotations

import base64
import json
import random
import string

import pytest

from prepare import quality

RNG = random.Random(20240611)
ALNUM = string.ascii_letters + string.digits
URLSAFE = ALNUM + "-_"


def rand(n: int, alphabet: str = ALNUM) -> str:
    return "".join(RNG.choice(alphabet) for _ in range(n))


def b64url(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def pem(kind: str, n_bytes: int = 600) -> str:
    body = base64.b64encode(RNG.randbytes(n_bytes)).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {kind}-----", *lines, f"-----END {kind}-----"])


PNG_BASE64 = base64.b64encode(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + RNG.randbytes(300)).decode()
SHA256 = RNG.randbytes(32).hex()
COMMIT = RNG.randbytes(20).hex()

# --- (a) ordinary Alpaca-style records: nothing to flag ---------------------------------------

ORDINARY = [
    pytest.param(
        "Give three tips for staying healthy.\n1. Eat a balanced diet with plenty of fruits and vegetables.\n"
        "2. Exercise regularly.\n3. Get enough sleep.",
        id="tips",
    ),
    pytest.param(
        "Explain why a strong password matters.\nA strong password is long and unique, so attackers cannot "
        "guess it. A passphrase such as 'correct horse battery staple' is easier to remember.",
        id="password-prose",
    ),
    pytest.param(
        "Generate a random password of 10 characters.\nHere is one: t7#Kq9!zW2", id="short-generated-password"
    ),
    pytest.param(
        "Write a function that checks whether a password is strong.\n```python\n"
        "def is_strong(password: str) -> bool:\n"
        "    return len(password) >= 12 and any(c.isdigit() for c in password)\n\n"
        'password = "Abc123!@#"\nprint(is_strong(password))\n```',
        id="python-password-check",
    ),
    pytest.param(
        'import requests\n\nAPI_KEY = "YOUR_API_KEY"\nheaders = {"Authorization": f"Bearer {API_KEY}"}\n'
        'response = requests.get("https://api.example.com/v1/items?limit=10&page=2", headers=headers)',
        id="python-api-key-placeholder",
    ),
    pytest.param(
        'import openai\n\nopenai.api_key = "sk-..."\n# or, in your shell:\nexport OPENAI_API_KEY="sk-' + "x" * 48 + '"',
        id="openai-key-placeholder",
    ),
    pytest.param(
        "const password = process.env.DB_PASSWORD;\n"
        'const token = jwt.sign({ id: user.id }, process.env.JWT_SECRET, { expiresIn: "1h" });',
        id="js-env-secrets",
    ),
    pytest.param("$ mysql -u root -p\nEnter password: ********\nWelcome to the MySQL monitor.", id="shell-masked"),
    pytest.param(
        "services:\n  db:\n    image: postgres:16\n    environment:\n      POSTGRES_USER: postgres\n"
        "      POSTGRES_PASSWORD: changeme\n      DATABASE_URL: postgres://postgres:changeme@db:5432/app",
        id="compose-changeme",
    ),
    pytest.param(
        "# settings.py\nSECRET_KEY = 'django-insecure-change-me-in-production'\nDEBUG = True",
        id="django-secret-placeholder",
    ),
    pytest.param(
        'app = Flask(__name__)\napp.config["SECRET_KEY"] = os.urandom(24)\n'
        'app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///site.db"',
        id="flask-secret-expression",
    ),
    pytest.param(f"$ sha256sum ubuntu-24.04.iso\n{SHA256}  ubuntu-24.04.iso", id="sha256sum"),
    pytest.param(
        f"commit {COMMIT}\nAuthor: Jane Doe <jane@example.com>\nDate:   Mon Jan 15 10:30:00 2024 +0100\n\n"
        "    Fix the off-by-one error in the pager",
        id="git-log",
    ),
    pytest.param(
        'import uuid\n\nrequest_id = uuid.uuid4()\nsession_token = "123e4567-e89b-12d3-a456-426614174000"  # a UUID',
        id="uuid",
    ),
    pytest.param(
        f'Embed the logo inline:\n<img src="data:image/png;base64,{PNG_BASE64}" alt="logo">', id="base64-image"
    ),
    pytest.param(
        "Open https://www.example.com/search?q=lora+fine+tuning&hl=en&utm_source=newsletter&utm_medium=email"
        f"&id={RNG.randbytes(16).hex()} to see the results.",
        id="url-query-string",
    ),
    pytest.param("Solve for x: 3x + 7 = 22.\nSubtract 7 from both sides: 3x = 15, so x = 5.", id="math-equation"),
    pytest.param("Find the derivative of f(x) = x^3 + 2x.\nf'(x) = 3x^2 + 2", id="math-derivative"),
    pytest.param("Name five countries in Europe.\nFrance, Germany, Spain, Italy and Portugal.", id="list"),
    pytest.param(
        "What is a JWT?\nA JSON Web Token has three parts, header.payload.signature, written like xxxxx.yyyyy.zzzzz. "
        'For example: token = "eyJhbGciOiJIUzI1NiJ9.payload.signature"',
        id="jwt-prose",
    ),
    pytest.param(
        "$ aws configure\nAWS Access Key ID [None]: AKIAXXXXXXXXXXXXXXXX\n"
        "AWS Secret Access Key [None]: ****************************************\nDefault region name [None]: eu-west-1",
        id="aws-configure-placeholder",
    ),
    pytest.param(
        "git remote set-url origin https://<username>:<token>@github.com/user/repo.git\nGITHUB_TOKEN=ghp_" + "x" * 36,
        id="github-placeholder",
    ),
    pytest.param(f'import stripe\n\nstripe.api_key = "sk_test_{rand(24)}"', id="stripe-test-key"),
    pytest.param(
        "SLACK_BOT_TOKEN=xoxb-your-token\nwebhook = https://hooks.slack.com/services/T00000000/B00000000/" + "X" * 24,
        id="slack-placeholder",
    ),
    pytest.param(
        'if pem.startswith("-----BEGIN PRIVATE KEY-----"):\n    load(pem)\n\n'
        "A key file looks like:\n-----BEGIN RSA PRIVATE KEY-----\n...\n-----END RSA PRIVATE KEY-----",
        id="pem-mention",
    ),
    pytest.param(
        "def compute_exponential_moving_average_with_bias_correction(values, beta=0.9):\n"
        "    return [v * (1 - beta) for v in values]",
        id="long-identifier",
    ),
    pytest.param(
        'max_tokens = 512\ntokenizer = AutoTokenizer.from_pretrained("meta-llama/Llama-2-7b-hf")\n'
        'pad_token = "<|endoftext|>"\ntokens: 4096',
        id="ml-tokens",
    ),
    pytest.param(
        'password_hash = "' + RNG.randbytes(32).hex() + '"  # sha256 of the password, never the password',
        id="password-hash",
    ),
    pytest.param("DATABASE_URL=postgresql://user:password@localhost:5432/mydb", id="url-placeholder-credentials"),
    pytest.param(
        '<script src="https://maps.googleapis.com/maps/api/js?key=YOUR_API_KEY&callback=initMap"></script>',
        id="google-maps-placeholder",
    ),
    pytest.param("Translate 'Where is the train station?' into French.\nOù est la gare ?", id="translation"),
    pytest.param(
        "import secrets\n\ntoken = secrets.token_urlsafe(32)\nprint(token)  # a fresh random token each run",
        id="secrets-module",
    ),
    pytest.param('curl -H "Authorization: Bearer $TOKEN" https://api.github.com/user', id="bearer-variable"),
    pytest.param(
        '<form>\n  <input type="password" name="password" placeholder="Enter your password">\n</form>',
        id="html-password-field",
    ),
    pytest.param(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\ndata:\n  password: cGFzc3dvcmQxMjM=\n"
        "  api_token: c3VwZXJzZWNyZXRwYXNzd29yZA==",
        id="k8s-base64-placeholder",
    ),
    pytest.param(
        'password_regex = r"^(?=.*[A-Z])(?=.*\\d)(?=.*[@$!%*?&])[A-Za-z\\d@$!%*?&]{12,}$"', id="password-regex"
    ),
    pytest.param(
        'password = "MySuperSecretPassword2024!"\nbackup_password = "CorrectHorseBatteryStaple1!"\n'
        'secret = "P4ssw0rd_Str0ng_2023"\napi_key = "abc123xyz456def789ghi"',
        id="dictionary-word-passwords",
    ),
    pytest.param('auth_key: "xxxx-xxxx-xxxx-xxxx"\nclient_secret: "********"\ntoken = "<API_TOKEN>"', id="masks"),
    pytest.param("Convert 255 to hexadecimal.\n255 = 0xFF, and the color #1a2b3c is a dark blue.", id="hex-numbers"),
]


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_text_is_not_flagged(text):
    assert quality.find_secrets([text]) == {}


# --- (b) fake secrets of every real format: flagged, with their type --------------------------

JWT = ".".join(
    [
        b64url({"alg": "HS256", "typ": "JWT"}),
        b64url({"sub": "4821", "name": "Ada", "iat": 1718000000}),
        rand(43, URLSAFE),
    ]
)

SECRETS = [
    pytest.param(
        f"aws_access_key_id = {'AKIA' + rand(16, string.ascii_uppercase + '234567')}", "AWS Access Key", id="aws"
    ),
    pytest.param("Sure: AKIAIOSFODNN7EXAMPLE is your AWS key.", "AWS Access Key", id="aws-docs-example"),
    pytest.param(f"my token is ghp_{rand(36)}", "GitHub Token", id="github-ghp"),
    pytest.param(f"GH_TOKEN=gho_{rand(36)}", "GitHub Token", id="github-gho"),
    pytest.param(f'"token": "ghs_{rand(36)}"', "GitHub Token", id="github-ghs"),
    pytest.param(f"github_pat_{rand(22)}_{rand(59)}", "GitHub Token", id="github-pat"),
    pytest.param(f"OPENAI_API_KEY=sk-{rand(20)}T3BlbkFJ{rand(20)}", "OpenAI Token", id="openai-legacy"),
    pytest.param(
        f'client = OpenAI(api_key="sk-proj-{rand(74, URLSAFE)}T3BlbkFJ{rand(74, URLSAFE)}")',
        "OpenAI Token",
        id="openai-project",
    ),
    pytest.param(f"ANTHROPIC_API_KEY=sk-ant-api03-{rand(93, URLSAFE)}AA", "Anthropic API Key", id="anthropic"),
    pytest.param(
        f"SLACK_BOT_TOKEN=xoxb-{rand(12, string.digits)}-{rand(13, string.digits)}-{rand(24)}",
        "Slack Token",
        id="slack-bot",
    ),
    pytest.param(
        f"xoxp-{rand(10, string.digits)}-{rand(10, string.digits)}-{rand(13, string.digits)}-{RNG.randbytes(16).hex()}",
        "Slack Token",
        id="slack-user",
    ),
    pytest.param(f"const mapsKey = 'AIza{rand(35, URLSAFE)}';", "Google API Key", id="google"),
    pytest.param(f"stripe.api_key = 'sk_live_{rand(99)}'", "Stripe Access Key", id="stripe-live"),
    pytest.param(f"STRIPE_RESTRICTED=rk_live_{rand(24)}", "Stripe Access Key", id="stripe-restricted"),
    pytest.param(
        f"from huggingface_hub import login\nlogin('hf_{rand(34, string.ascii_letters)}')",
        "Hugging Face Token",
        id="hf",
    ),
    pytest.param(f"Here is the key:\n{pem('RSA PRIVATE KEY')}", "Private Key", id="pem-rsa"),
    pytest.param(pem("PRIVATE KEY"), "Private Key", id="pem-pkcs8"),
    pytest.param(pem("EC PRIVATE KEY", 120), "Private Key", id="pem-ec"),
    pytest.param(pem("OPENSSH PRIVATE KEY"), "Private Key", id="pem-openssh"),
    pytest.param(
        '{"type": "service_account", "private_key": "'
        + pem("PRIVATE KEY").replace("\n", "\\n")
        + '\\n", "client_email": "bot@project.iam.gserviceaccount.com"}',
        "Private Key",
        id="pem-in-json",
    ),
    pytest.param(
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
        "Private Key",
        id="pem-short",
    ),
    pytest.param(f"curl -H 'Authorization: Bearer {JWT}' https://api.example.com/me", "JSON Web Token", id="jwt"),
    pytest.param(f'DB_PASSWORD = "{rand(22, ALNUM + "!#%^&*-_")}"', "Secret Keyword", id="assignment-password"),
    pytest.param(f'{{"client_id": "web", "client_secret": "{rand(40)}"}}', "Secret Keyword", id="json-client-secret"),
    pytest.param(f"export API_KEY={rand(32)}", "Secret Keyword", id="shell-api-key"),
    pytest.param(f'token: str = "{RNG.randbytes(20).hex()}"', "Secret Keyword", id="annotated-hex-token"),
    pytest.param(
        f"curl -H 'Authorization: Bearer {rand(40, URLSAFE)}' https://api.example.com/v1/me",
        "Bearer Token",
        id="bearer",
    ),
    pytest.param(
        f"DATABASE_URL=postgres://app:{rand(24)}@db.internal:5432/prod", "Basic Auth Credentials", id="url-password"
    ),
    pytest.param(f"GITLAB_TOKEN=glpat-{rand(20, URLSAFE)}", "GitLab Token", id="gitlab"),
    pytest.param(f"SENDGRID_API_KEY=SG.{rand(22, URLSAFE)}.{rand(43, URLSAFE)}", "SendGrid API Key", id="sendgrid"),
]


@pytest.mark.parametrize(("text", "kind"), SECRETS)
def test_real_key_formats_are_flagged_with_their_type(text, kind):
    found = quality.find_secrets([text])
    assert {f["type"] for f in found.get(0, [])} == {kind}


@pytest.mark.parametrize(("text", "kind"), SECRETS)
def test_redacted_text_holds_nothing_left_to_find(text, kind):
    values = [f["value"] for f in quality.find_secrets([text])[0]]
    assert min(map(len, values)) >= 16  # the whole key, not its prefix (detect-secrets gave `ghp` for GitHub)
    redacted = quality.redact({"text": text}, values)["text"]
    assert not any(v in redacted for v in values) and quality.find_secrets([redacted]) == {}


def test_findings_name_their_record_and_line():
    key = f"ghp_{rand(36)}"
    texts = ["nothing here", f"line one\nline two\nmy token is {key}", f"first\n{pem('PRIVATE KEY')}"]
    found = quality.find_secrets(texts)
    assert sorted(found) == [1, 2]
    assert found[1] == [{"type": "GitHub Token", "line": 3, "value": key}]
    assert [(f["type"], f["line"]) for f in found[2]] == [("Private Key", 2)]


def test_redact_removes_the_whole_key_block_and_only_the_value():
    block = pem("RSA PRIVATE KEY")
    secret = rand(32)
    record = {"prompt": "Store these for me", "completion": f"{block}\napi_key = '{secret}'\nThanks!"}
    found = quality.find_secrets([quality.record_text(record)])
    redacted = quality.redact(record, [f["value"] for f in found[0]])
    assert redacted == {"prompt": "Store these for me", "completion": "[REDACTED]\napi_key = '[REDACTED]'\nThanks!"}


@pytest.mark.parametrize(
    "record",
    [
        {"text": "TOKEN={key}"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "TOKEN={key}"}]},
    ],
    ids=["text", "messages"],
)
def test_redact_every_record_format(record):
    key = f"sk-ant-api03-{rand(93, URLSAFE)}AA"
    record = json.loads(json.dumps(record).replace("{key}", key))
    found = quality.find_secrets([quality.record_text(record)])
    redacted = json.dumps(quality.redact(record, [f["value"] for f in found[0]]))
    assert key not in redacted and "TOKEN=[REDACTED]" in redacted
