//! Keys made per run with `openssl`, and tokens minted with PyJWT (`tests/it/tokens/mint.py`),
//! an implementation independent of the gateway's, so a test of token checks cannot pass
//! by sharing a mistake with the code it tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::tools;

/// A key pair in PEM files.
#[derive(Debug, Clone)]
pub struct KeyPair {
    /// The private key (PKCS#8).
    pub private: PathBuf,
    /// Its public key (SPKI).
    pub public: PathBuf,
}

/// Every kind of key a gateway accepts, fresh for this run.
pub struct Keys {
    _dir: tempfile::TempDir,
    python: PathBuf,
    /// An HMAC secret (48 random bytes, hex).
    pub secret: String,
    /// RSA 2048.
    pub rsa: KeyPair,
    /// Another RSA key, which no gateway trusts.
    pub rsa_other: KeyPair,
    /// EC P-256.
    pub ec: KeyPair,
    /// Ed25519.
    pub ed: KeyPair,
}

impl Keys {
    /// Makes the keys, or `None` (after reporting the skip) without openssl or PyJWT.
    pub fn generate() -> Option<Keys> {
        let openssl = tools::require(tools::openssl())?;
        let python = tools::require(tools::python_with_jwt())?;
        let dir = tempfile::tempdir().expect("a temporary directory");
        let pair = |name: &str, args: &[&str]| {
            let private = dir.path().join(format!("{name}.pem"));
            let public = dir.path().join(format!("{name}.pub.pem"));
            run(Command::new(&openssl)
                .args(["genpkey", "-out"])
                .arg(&private)
                .args(args));
            run(Command::new(&openssl)
                .args(["pkey", "-pubout", "-in"])
                .arg(&private)
                .arg("-out")
                .arg(&public));
            KeyPair { private, public }
        };
        let rsa = pair(
            "rsa",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        );
        let rsa_other = pair(
            "rsa-other",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        );
        let ec = pair(
            "ec",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        );
        let ed = pair("ed", &["-algorithm", "ED25519"]);
        let random = Command::new(&openssl)
            .args(["rand", "-hex", "48"])
            .output()
            .expect("openssl rand");
        let secret = String::from_utf8_lossy(&random.stdout).trim().to_owned();
        assert_eq!(secret.len(), 96, "a 48-byte secret");
        Some(Keys {
            _dir: dir,
            python,
            secret,
            rsa,
            rsa_other,
            ec,
            ed,
        })
    }

    /// Answers the requests of `mint.py` (tokens and JWKs), in one Python run.
    pub fn mint(&self, requests: &[Value]) -> Vec<Value> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/tokens/mint.py");
        let mut child = Command::new(&self.python)
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mint.py");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(Value::from(requests.to_vec()).to_string().as_bytes())
            .expect("write the requests");
        let out = child.wait_with_output().expect("mint.py output");
        assert!(
            out.status.success(),
            "mint.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let answers: Vec<Value> = serde_json::from_slice(&out.stdout).expect("mint.py JSON");
        assert_eq!(answers.len(), requests.len());
        answers
    }

    /// One token signed with the HMAC secret.
    pub fn hs256(&self, claims: Value) -> String {
        self.mint(&[json!({"alg": "HS256", "secret": self.secret, "claims": claims})])[0]
            .as_str()
            .expect("a token")
            .to_owned()
    }
}

/// Seconds since the epoch, `offset` from now.
pub fn at(offset: i64) -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64;
    now + offset
}

/// Claims granting `subscribe` and `publish` patterns (and the stats when `stats`),
/// expiring in an hour.
pub fn grants(subscribe: &[&str], publish: &[&str], stats: bool) -> Value {
    json!({
        "sub": "tester",
        "exp": at(3600),
        "eventfabric": {"subscribe": subscribe, "publish": publish, "stats": stats},
    })
}

fn run(command: &mut Command) {
    let out = command.output().expect("run openssl");
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
