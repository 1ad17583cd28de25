//! A fake identity provider: the committed test keys of `tests/keys`, tokens signed with them,
//! and wiremock answers publishing their JWKS.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::path::PathBuf;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use wiremock::ResponseTemplate;

/// One committed key pair: `tests/keys/{name}.pem` (private) and `{name}.jwk.json` (public).
pub struct TestKey {
    pub name: &'static str,
    pub alg: Algorithm,
}

pub const RSA_1: TestKey = TestKey {
    name: "rsa-1",
    alg: Algorithm::RS256,
};
/// The key the IdP rotates in after the gateway started.
pub const RSA_2: TestKey = TestKey {
    name: "rsa-2",
    alg: Algorithm::RS256,
};
/// An attacker's key, published under the kid `rsa-1` on the attacker's own server.
pub const ATTACKER: TestKey = TestKey {
    name: "rsa-attacker",
    alg: Algorithm::RS256,
};
pub const EC_P256: TestKey = TestKey {
    name: "ec-p256",
    alg: Algorithm::ES256,
};
pub const ED25519: TestKey = TestKey {
    name: "ed25519",
    alg: Algorithm::EdDSA,
};

fn file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keys")
        .join(name)
}

impl TestKey {
    pub fn pem(&self) -> Vec<u8> {
        std::fs::read(file(&format!("{}.pem", self.name))).expect("test key")
    }

    pub fn jwk(&self) -> Value {
        let text = std::fs::read_to_string(file(&format!("{}.jwk.json", self.name))).expect("jwk");
        serde_json::from_str(&text).expect("jwk json")
    }

    pub fn kid(&self) -> String {
        self.jwk()["kid"].as_str().expect("kid").to_owned()
    }

    fn encoding_key(&self) -> EncodingKey {
        let pem = self.pem();
        match self.alg {
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            _ => EncodingKey::from_rsa_pem(&pem),
        }
        .expect("private key")
    }

    /// The header an honest IdP sends: this key's algorithm and kid.
    pub fn header(&self) -> Header {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid());
        header
    }

    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with(self.header(), claims)
    }

    pub fn sign_with(&self, header: Header, claims: &Value) -> String {
        jsonwebtoken::encode(&header, claims, &self.encoding_key()).expect("sign")
    }
}

/// `{"keys": [...]}` with the public half of each key.
pub fn jwks(keys: &[&TestKey]) -> ResponseTemplate {
    let keys: Vec<Value> = keys.iter().map(|k| k.jwk()).collect();
    ResponseTemplate::new(200).set_body_raw(json!({ "keys": keys }).to_string(), "application/json")
}

/// A manager's claims, valid for ten minutes, merged with `extra`.
pub fn idp_claims(extra: Value) -> Value {
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = json!({
        "sub": "carol",
        "roles": ["billing-manager"],
        "iat": now,
        "exp": now + 600,
    });
    if let (Some(c), Value::Object(extra)) = (claims.as_object_mut(), extra) {
        c.extend(extra);
    }
    claims
}
