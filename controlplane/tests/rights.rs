//! Rights management over real gRPC on loopback (SQLite and, with `DATABASE_URL`,
//! Postgres): admin authentication, viewer credentials on join, chunk tokens (issue,
//! verification with the published keys, renewal, key rotation), revocation and bad-peer
//! reports. No wall-clock assertion: waits are bounded by `PATIENCE` only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use starling_controlplane::auth::{self, NEEDS_BEARER};
use starling_controlplane::credential::JwtPolicy;
use starling_controlplane::tokens::{RETIRE_AFTER, SIGN_LEAD, TokenKeys};
use starling_controlplane::{
    AuthConfig, BearerInterceptor, ControlPlane, ControlPlaneHandle, ServiceConfig, Store,
};
use starling_proto::token::{Scopes, TokenError, TokenVerifier, peek_unverified};
use starling_proto::v1::admin_service_client::AdminServiceClient;
use starling_proto::v1::edge_service_client::EdgeServiceClient;
use starling_proto::v1::node_command::Command;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{
    BroadcastRef, CommandsRequest, CreateBroadcastRequest, HeartbeatRequest, HeartbeatResponse,
    JoinRequest, JoinResponse, ListBroadcastsRequest, NodeCommand, PublicKey, RegisterNodeRequest,
    ReportPeerRequest, RevokeViewerRequest,
};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const PATIENCE: Duration = Duration::from_secs(20);
const ADMIN_KEY: &str = "rights-test-admin-key-0123456789";

/// Fixed test key pairs (also used by `credential.rs`'s unit tests).
const ED_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEICl/n6To2Ym7X/M/7XDCOP6iNy+MkyOPELdbZjVffOeq
-----END PRIVATE KEY-----
";
const ED_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEApDsEZQ6LOeWJGJahPFJHM1c2Urp0PiQeYlE+0t/Foko=
-----END PUBLIC KEY-----
";
const RSA_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQCimTsFDG1OBEUl
pLV3O7FvC2CQtUdYTk01zS7KFICMYMS39KRm27wjyzzLtnsI1loRyQ2YOZ7TUccM
BgMukRRQrTE7y5janBtQ6d9uiIRyv//0sokbI+a2rdRpuOnP8nrqnLvCZD7q5Au/
y0NOa3TWrRuJMYWckeh1Dz38NOjfsTA1VpKKdzx/biZAoTNjyWZ1720RJXpHio0Q
8h3NKD+sn34SvliKMFrL3AIaIw3kJ09oyDSSgPblMZ1NJUgYGkXmExXk4c3pgMbd
lAFohChtrRFKFiJVuB7h6YtVhF/67pjq1Unnt3+RWD+YiL3jqaZpY+/N9hqDh/q5
XcckRSUnAgMBAAECggEAOZfYAW5I6zj0+yPvyPeCXkhj4G3tgvhdPeDbIWYIsHB4
TYZgkzRi3DTZaHjO9K7kQWd7Ir/KI6TUQcyBZQWrcfYeucTgdBKWVF86ro65h2G9
ukFg8hWR24QP+JCwdOE5K4/vq6fRZ2b2SG2pfgXu4Tl4xuwdHPvLoGcROBvPnqe1
VfPVrGYB9TaGiiKd6oQOkaxtUI2FGGrwPUup5DVVfrVRfZ9XGMRPnR8s8GJAMuda
njlgh8xLyLvjmaFpwzKB+OelfI1z6Ifr1oV244OezebdHWA0z24LgH+OTMg84R6V
ipP1m7eEREWbWRmZSFHSyFYM+wzW5vlMpb0uU6ozmQKBgQDlnUyaQsOHtPK81aNO
EaARfa2c0e//oImkRfMwaUIBEXJh93j+OIUi5ovnOKC6E4GIfoEp1YNdUPY26XrK
RzvAv3AdrrqISShw1dzXRAJLrB/TiDW585Lb88Ram8Ge5oPM1oLAQAkOZNq1QB0j
Q9ffAwLooWf1q1B4k4VqyGxEOQKBgQC1SHxx/ojGicZsAfyACxG/WXVgFKdGrYJ+
LpueFVPUBPncNH50Jq1K/djf2NVbVwj1Kn5170OT3bzZZprVMg/le2cLVP56xrrp
b/ociitdnmdG5Z7a2QH0slm4H96D/cm5mZ5ewmgT48RnysxqSJ6O1GcAciC2hDEY
H6Nkap50XwKBgQDVTiWlgLRIU47UYdsNYU5EMW6hKl48KRT06I6cwIuyllSeMdnS
wQrdezMon/CgLBK/jFXNWS5p+BZiuM97LmWSD8XFrVZX2S6ac/JugB1p0wLV7cmL
b31Um8YjLmLWjOqP1g8tLc+78XFDw8XNxu65nACNv7PmAzoEaXcd1gbN8QKBgQCY
p2B70b41iYE4JHgPDsM0Ic3QSbQOtT+EqBTNCuKbUFFjGCVAA+27j4VYAkyv7NuT
L+RrxT5fvsIvQ9KwIsb2FHNSPJFKrBxrRKsV61fXLvOC5Qte+IxIFQOuI9AJz+VV
0EFnREfGL++NA14dReeXGM9ftbtMVobM7J93iLzD+wKBgFTuSMut1JxUfW8BKbD/
LixyVodjQIogKaJMI0DSSmVloezw9qCpf4Eggaa9L/8dcZ+I7KRmpJQsCZvgt/NV
VqEpXaUZuzX69lTUpB/h9nGMg4vbKB/F9QfmEtLNycBxm2I1CwP2HJemM9JpAPrp
BlggDmEKxjFHwNjIV1s5UMHR
-----END PRIVATE KEY-----
";
const RSA_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAopk7BQxtTgRFJaS1dzux
bwtgkLVHWE5NNc0uyhSAjGDEt/SkZtu8I8s8y7Z7CNZaEckNmDme01HHDAYDLpEU
UK0xO8uY2pwbUOnfboiEcr//9LKJGyPmtq3Uabjpz/J66py7wmQ+6uQLv8tDTmt0
1q0biTGFnJHodQ89/DTo37EwNVaSinc8f24mQKEzY8lmde9tESV6R4qNEPIdzSg/
rJ9+Er5YijBay9wCGiMN5CdPaMg0koD25TGdTSVIGBpF5hMV5OHN6YDG3ZQBaIQo
ba0RShYiVbge4emLVYRf+u6Y6tVJ57d/kVg/mIi946mmaWPvzfYag4f6uV3HJEUl
JwIDAQAB
-----END PUBLIC KEY-----
";

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// The audience and issuer the harness's control plane requires of viewer JWTs, and
/// of admin JWTs.
const VIEWER_AUD: &str = "starling-rights-test";
const ADMIN_AUD: &str = "starling-rights-test-admin";
const ISSUER: &str = "rights-test-backend";

/// `claims` with the configured `aud` (the admin one for `role: "admin"`) and `iss`
/// added where absent.
fn addressed(claims: &serde_json::Value) -> serde_json::Value {
    let mut c = claims.clone();
    if let Some(m) = c.as_object_mut() {
        let aud = if m.get("role").and_then(|r| r.as_str()) == Some("admin") {
            ADMIN_AUD
        } else {
            VIEWER_AUD
        };
        m.entry("aud").or_insert_with(|| json!(aud));
        m.entry("iss").or_insert_with(|| json!(ISSUER));
    }
    c
}

/// An EdDSA JWT with `claims` (plus the configured `aud` and `iss` where absent).
fn ed_jwt(claims: &serde_json::Value) -> String {
    ed_jwt_exact(&addressed(claims))
}

/// An EdDSA JWT with exactly `claims`.
fn ed_jwt_exact(claims: &serde_json::Value) -> String {
    let key = EncodingKey::from_ed_pem(ED_PRIVATE_PEM.as_bytes()).unwrap();
    jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), claims, &key).unwrap()
}

fn rsa_jwt(claims: &serde_json::Value) -> String {
    let key = EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).unwrap();
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &addressed(claims), &key).unwrap()
}

/// A viewer JWT for `broadcast` with subject `sub`, valid for an hour.
fn viewer_jwt(sub: &str, broadcast: &str) -> String {
    ed_jwt(&json!({"sub": sub, "broadcast": broadcast, "exp": now_secs() + 3600}))
}

fn verifier(keys: &[PublicKey]) -> TokenVerifier {
    let mut v = TokenVerifier::new();
    for k in keys {
        v.add_key(k.key_id, &k.ed25519).unwrap();
    }
    v
}

type Admin = AdminServiceClient<InterceptedService<Channel, BearerInterceptor>>;

struct Harness {
    cp: ControlPlaneHandle,
    channel: Channel,
}

impl Harness {
    async fn start(store: Store) -> Harness {
        Self::start_with(store, Duration::from_secs(120), Duration::from_secs(5)).await
    }

    async fn start_with(store: Store, token_ttl: Duration, key_refresh: Duration) -> Harness {
        let service = ServiceConfig {
            heartbeat_interval: Duration::from_millis(100),
            // Nodes and sessions never time out during these tests.
            node_timeout: Duration::from_secs(600),
            liveness_tick: Duration::from_millis(50),
            missed_heartbeats: 6000,
            token_ttl,
            key_refresh,
            ..ServiceConfig::default()
        };
        let auth = AuthConfig {
            admin_key: Some(ADMIN_KEY.into()),
            admin_jwt_keys: vec![auth::parse_jwt_key_pem(ED_PUBLIC_PEM.as_bytes()).unwrap()],
            viewer_jwt_keys: vec![
                auth::parse_jwt_key_pem(ED_PUBLIC_PEM.as_bytes()).unwrap(),
                auth::parse_jwt_key_pem(RSA_PUBLIC_PEM.as_bytes()).unwrap(),
            ],
            leeway: Duration::from_secs(5),
            viewer_jwt: JwtPolicy::new(VIEWER_AUD, ISSUER, 24 * 3600),
            admin_jwt: JwtPolicy::new(ADMIN_AUD, ISSUER, 3600),
            rotate_token_key: false,
            node_key: None,
        };
        let cp =
            ControlPlane::bind_with_store("127.0.0.1:0".parse().unwrap(), store, service, &auth)
                .await
                .unwrap()
                .spawn();
        let channel = Channel::from_shared(cp.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        Harness { cp, channel }
    }

    fn admin_with(&self, token: &str) -> Admin {
        AdminServiceClient::with_interceptor(
            self.channel.clone(),
            BearerInterceptor::new(token).unwrap(),
        )
    }

    fn admin(&self) -> Admin {
        self.admin_with(ADMIN_KEY)
    }

    fn viewer(&self) -> ViewerServiceClient<Channel> {
        ViewerServiceClient::new(self.channel.clone())
    }

    /// A viewer client calling from another loopback address (the control plane
    /// counts distinct reporters by the address they call from).
    async fn viewer_from(&self, ip: [u8; 4]) -> ViewerServiceClient<Channel> {
        let channel = Channel::from_shared(self.cp.url())
            .unwrap()
            .local_address(Some(std::net::IpAddr::from(ip)))
            .connect()
            .await
            .unwrap();
        ViewerServiceClient::new(channel)
    }

    /// EdgeService as a node: the admin key is accepted as a node credential (node
    /// authentication is covered by `tests/node_auth.rs`).
    fn edge(&self) -> EdgeServiceClient<InterceptedService<Channel, BearerInterceptor>> {
        EdgeServiceClient::with_interceptor(
            self.channel.clone(),
            BearerInterceptor::new(ADMIN_KEY).unwrap(),
        )
    }

    /// Creates and starts a broadcast (a node must be registered for joins to work).
    async fn live_broadcast(&self, name: &str, public: bool) -> String {
        let mut admin = self.admin();
        let id = admin
            .create_broadcast(CreateBroadcastRequest {
                name: name.into(),
                source_url: "http://127.0.0.1:8000/live.ts".into(),
                chunk_duration_ms: 0,
                substreams: 4,
                public,
            })
            .await
            .unwrap()
            .into_inner()
            .id;
        admin
            .start_broadcast(BroadcastRef { id: id.clone() })
            .await
            .unwrap();
        id
    }

    async fn join(
        &self,
        broadcast: &str,
        credential: &str,
        peer_addr: &str,
        upload_kbps: u32,
    ) -> Result<JoinResponse, tonic::Status> {
        self.viewer()
            .join(JoinRequest {
                holder_key: vec![7; 32],
                broadcast_id: broadcast.into(),
                credential: credential.into(),
                client_version: "rights-test".into(),
                peer_addr: peer_addr.into(),
                upload_kbps,
                mac_tickets: false,
                host_addr: String::new(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn heartbeat(&self, session: &str) -> HeartbeatResponse {
        self.viewer()
            .heartbeat(HeartbeatRequest {
                session_id: session.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn shutdown(self) {
        drop(self.channel);
        self.cp.shutdown().await.unwrap();
    }
}

/// A fake data-plane node with a chunk-signing key.
struct FakeNode {
    id: String,
    chunk_key: PublicKey,
    token_keys: Vec<PublicKey>,
    commands: tonic::Streaming<NodeCommand>,
}

impl FakeNode {
    async fn register(h: &Harness, name: &str, key_id: u32) -> FakeNode {
        let mut edge = h.edge();
        let chunk_key = PublicKey {
            key_id,
            ed25519: vec![u8::try_from(key_id % 251).unwrap(); 32],
        };
        let reg = edge
            .register(RegisterNodeRequest {
                node_name: name.into(),
                wire_addr: format!("{name}.test:9000"),
                http_addr: format!("{name}.test:9080"),
                cores: 1,
                capacity_viewers: 1000,
                chunk_signing_key: Some(chunk_key.clone()),
            })
            .await
            .unwrap()
            .into_inner();
        let commands = edge
            .commands(CommandsRequest {
                node_id: reg.node_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        FakeNode {
            id: reg.node_id,
            chunk_key,
            token_keys: reg.token_keys,
            commands,
        }
    }

    /// The next command matching `pick`, skipping the others.
    async fn wait_for<T>(&mut self, mut pick: impl FnMut(Command) -> Option<T>) -> T {
        loop {
            let cmd = tokio::time::timeout(PATIENCE, self.commands.next())
                .await
                .expect("no matching command within the patience bound")
                .expect("command stream ended")
                .expect("command stream error")
                .command
                .expect("empty command");
            if let Some(t) = pick(cmd) {
                return t;
            }
        }
    }
}

// ---------------------------------------------------------------------------

async fn admin_calls_need_admin_credentials(store: Store) {
    let h = Harness::start(store).await;
    let list = ListBroadcastsRequest::default();

    // No authorization header.
    let e = AdminServiceClient::new(h.channel.clone())
        .list_broadcasts(list)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(e.message(), NEEDS_BEARER);

    // A wrong key: refused without echoing it.
    let e = h
        .admin_with("not-the-admin-key-at-all")
        .list_broadcasts(list)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        !e.message().contains("not-the-admin-key"),
        "{}",
        e.message()
    );
    assert!(!e.message().contains(ADMIN_KEY));

    // The static key.
    h.admin().list_broadcasts(list).await.unwrap();

    // An admin JWT.
    let jwt = ed_jwt(&json!({"sub": "ops", "role": "admin", "exp": now_secs() + 600}));
    h.admin_with(&jwt).list_broadcasts(list).await.unwrap();

    // An authentic JWT for the admin audience without the admin role: permission denied.
    let jwt = ed_jwt(&json!({"sub": "ops", "aud": ADMIN_AUD, "exp": now_secs() + 600}));
    let e = h.admin_with(&jwt).list_broadcasts(list).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    // A viewer credential is not an admin credential either: it is for the viewers'
    // audience.
    let e = h
        .admin_with(&viewer_jwt("alice", "*"))
        .list_broadcasts(list)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("another audience"), "{}", e.message());

    // Expired admin JWT.
    let jwt = ed_jwt(&json!({"sub": "ops", "role": "admin", "exp": now_secs() - 3600}));
    let e = h.admin_with(&jwt).list_broadcasts(list).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        e.message()
            .starts_with("admin token rejected: credential expired"),
        "{}",
        e.message()
    );

    // An admin JWT signed by a key the control plane does not trust (RS256 is only a
    // viewer key here).
    let jwt = rsa_jwt(&json!({"sub": "ops", "role": "admin", "exp": now_secs() + 600}));
    let e = h.admin_with(&jwt).list_broadcasts(list).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // Every admin RPC is guarded, including the rights ones.
    let e = AdminServiceClient::new(h.channel.clone())
        .revoke_viewer(RevokeViewerRequest {
            broadcast_id: "b".into(),
            subject: "s".into(),
            session_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    h.shutdown().await;
}

async fn viewer_credentials_on_join(store: Store) {
    let h = Harness::start(store).await;
    let mut node = FakeNode::register(&h, "edge", 7).await;
    let private = h.live_broadcast("private", false).await;
    let other = h.live_broadcast("other", false).await;
    let public = h.live_broadcast("public", true).await;

    // Nodes learn which broadcasts need tokens.
    for _ in 0..3 {
        let ingest = node
            .wait_for(|c| match c {
                Command::Ingest(i) => Some(i),
                _ => None,
            })
            .await;
        assert_eq!(ingest.public, ingest.broadcast_id == public);
    }
    let b = h
        .admin()
        .get_broadcast(BroadcastRef { id: public.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(b.public);

    // No credential.
    let e = h.join(&private, "", "", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        e.message()
            .contains(&format!("broadcast {private} needs a viewer credential")),
        "{}",
        e.message()
    );
    // Garbage.
    let e = h.join(&private, "not-a-jwt", "", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("malformed"), "{}", e.message());
    // EdDSA, for this broadcast.
    let j = h
        .join(&private, &viewer_jwt("alice", &private), "", 0)
        .await
        .unwrap();
    assert!(!j.session_id.is_empty());
    // RS256.
    let jwt = rsa_jwt(&json!({"sub": "bob", "broadcast": private, "exp": now_secs() + 60}));
    h.join(&private, &jwt, "", 0).await.unwrap();
    // Wildcard.
    h.join(&private, &viewer_jwt("carol", "*"), "", 0)
        .await
        .unwrap();
    // For another broadcast.
    let e = h
        .join(&private, &viewer_jwt("alice", &other), "", 0)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    // Expired.
    let jwt = ed_jwt(&json!({"sub": "alice", "broadcast": private, "exp": now_secs() - 600}));
    let e = h.join(&private, &jwt, "", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("expired"), "{}", e.message());
    // Forged: the payload edited after signing.
    let good = viewer_jwt("alice", &other);
    let mut parts: Vec<&str> = good.split('.').collect();
    let forged_payload =
        base64_url(&json!({"sub": "alice", "broadcast": "*", "exp": now_secs() + 60}));
    parts[1] = &forged_payload;
    let e = h.join(&private, &parts.join("."), "", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("signature"), "{}", e.message());

    // Public: no credential needed, and a bad one is ignored.
    h.join(&public, "", "", 0).await.unwrap();
    h.join(&public, "garbage", "", 0).await.unwrap();
    h.shutdown().await;
}

/// Issue 18 part 4: viewer and admin JWTs must name the configured audience and
/// issuer, carry `exp`, and live at most the configured maximum (24 h viewers, 1 h
/// admins here); each refusal is UNAUTHENTICATED with its reason, and a good one works.
async fn jwt_audience_issuer_and_lifetime_are_required(store: Store) {
    let h = Harness::start(store).await;
    let _node = FakeNode::register(&h, "edge", 9).await;
    let b = h.live_broadcast("scoped", false).await;
    let now = now_secs();
    let viewer = |extra: serde_json::Value| {
        let mut c = json!({"sub": "v", "broadcast": b, "aud": VIEWER_AUD, "iss": ISSUER,
                           "iat": now, "exp": now + 600});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        ed_jwt_exact(&c)
    };
    h.join(&b, &viewer(json!({})), "", 0).await.unwrap();
    // `aud` as an array that holds ours is fine.
    h.join(&b, &viewer(json!({"aud": ["cdn", VIEWER_AUD]})), "", 0)
        .await
        .unwrap();
    for (what, extra, reason) in [
        ("no aud", json!({"aud": null}), "lacks the \"aud\" claim"),
        (
            "another aud",
            json!({"aud": "some-other-service"}),
            "another audience",
        ),
        (
            "the admin aud",
            json!({"aud": ADMIN_AUD}),
            "another audience",
        ),
        ("no iss", json!({"iss": null}), "lacks the \"iss\" claim"),
        ("another iss", json!({"iss": "mallory"}), "another issuer"),
        ("no exp", json!({"exp": null}), "lacks the \"exp\" claim"),
        (
            "25 h",
            json!({"exp": now + 25 * 3600}),
            "longer than the 86400s allowed",
        ),
        (
            "25 h without iat",
            json!({"iat": null, "exp": now + 25 * 3600}),
            "longer than the 86400s allowed",
        ),
    ] {
        let e = h.join(&b, &viewer(extra), "", 0).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
        assert!(e.message().contains(reason), "{what}: {}", e.message());
    }

    let list = ListBroadcastsRequest::default();
    let admin = |extra: serde_json::Value| {
        let mut c = json!({"sub": "ops", "role": "admin", "aud": ADMIN_AUD, "iss": ISSUER,
                           "iat": now, "exp": now + 600});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        ed_jwt_exact(&c)
    };
    h.admin_with(&admin(json!({})))
        .list_broadcasts(list)
        .await
        .unwrap();
    for (what, extra, reason) in [
        (
            "the viewer aud",
            json!({"aud": VIEWER_AUD}),
            "another audience",
        ),
        ("no aud", json!({"aud": null}), "lacks the \"aud\" claim"),
        ("another iss", json!({"iss": "mallory"}), "another issuer"),
        (
            "2 h",
            json!({"exp": now + 7200}),
            "longer than the 3600s allowed",
        ),
    ] {
        let e = h
            .admin_with(&admin(extra))
            .list_broadcasts(list)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
        assert!(e.message().contains(reason), "{what}: {}", e.message());
    }
    h.shutdown().await;
}

/// Keys without an audience or issuer: the control plane does not start, and says which
/// flag is missing.
#[test]
fn jwt_keys_without_audience_or_issuer_refuse_to_start() {
    let key = || auth::parse_jwt_key_pem(ED_PUBLIC_PEM.as_bytes()).unwrap();
    let cases = [
        (
            AuthConfig {
                viewer_jwt_keys: vec![key()],
                ..AuthConfig::default()
            },
            "--viewer-jwt-audience",
        ),
        (
            AuthConfig {
                viewer_jwt_keys: vec![key()],
                viewer_jwt: JwtPolicy {
                    issuer: None,
                    ..JwtPolicy::new(VIEWER_AUD, ISSUER, 60)
                },
                ..AuthConfig::default()
            },
            "--viewer-jwt-issuer",
        ),
        (
            AuthConfig {
                admin_jwt_keys: vec![key()],
                ..AuthConfig::default()
            },
            "--admin-jwt-audience",
        ),
        (
            AuthConfig {
                admin_jwt_keys: vec![key()],
                admin_jwt: JwtPolicy {
                    issuer: Some(" ".into()),
                    ..JwtPolicy::new(ADMIN_AUD, ISSUER, 60)
                },
                ..AuthConfig::default()
            },
            "--admin-jwt-issuer",
        ),
    ];
    for (config, flag) in cases {
        let e = auth::Authenticator::new(&config).unwrap_err().to_string();
        assert!(e.contains(flag), "{flag}: {e}");
    }
    // Without keys nothing is needed.
    auth::Authenticator::new(&AuthConfig::default()).unwrap();
}

fn base64_url(v: &serde_json::Value) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

async fn join_issues_verifiable_chunk_token(store: Store) {
    let h = Harness::start(store).await;
    let node = FakeNode::register(&h, "edge", 42).await;
    assert_eq!(node.token_keys.len(), 1);
    let b = h.live_broadcast("tokens", false).await;
    // A chunk-signing key must be a raw 32-byte Ed25519 key.
    let e = h
        .edge()
        .register(RegisterNodeRequest {
            node_name: "bad-key".into(),
            wire_addr: "bad.test:9000".into(),
            http_addr: "bad.test:9080".into(),
            cores: 1,
            capacity_viewers: 10,
            chunk_signing_key: Some(PublicKey {
                key_id: 1,
                ed25519: vec![0; 31],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // A relaying viewer: PLAY | RELAY.
    let relay = h
        .join(&b, &viewer_jwt("alice", &b), "127.0.0.1:7001", 4000)
        .await
        .unwrap();
    assert_eq!(relay.token_keys, node.token_keys);
    assert_eq!(relay.chunk_keys, vec![node.chunk_key.clone()]);
    assert_eq!(relay.report_interval_ms, 5000);
    let v = verifier(&relay.token_keys);
    let claims = v
        .verify(
            &relay.chunk_token,
            &b,
            Scopes::PLAY | Scopes::RELAY,
            now_ms(),
            5_000,
        )
        .unwrap();
    assert_eq!(claims.peer_id, relay.peer_id);
    assert_eq!(claims.session_id, relay.peer_id);
    assert_eq!(claims.broadcast_id, b);
    // Bound to the key the join named (docs/PROTOCOL.md, proof of possession).
    assert_eq!(claims.holder_key, [7; 32]);
    // A join without a usable holder key is refused: an SDK that cannot prove fails
    // here, clearly, rather than at every link.
    for key in [vec![], vec![7; 31], vec![0; 32]] {
        let e = h
            .viewer()
            .join(JoinRequest {
                holder_key: key.clone(),
                broadcast_id: b.clone(),
                credential: viewer_jwt("carol", &b),
                client_version: "rights-test".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{key:?}: {e:?}");
        assert!(e.message().contains("holder_key"), "{e:?}");
    }
    assert_eq!(
        i64::try_from(claims.expires_at_ms).unwrap(),
        relay.token_expires_at_unix_ms
    );
    assert_eq!(claims.expires_at_ms - claims.issued_at_ms, 120_000);
    assert_eq!(
        v.verify(&relay.chunk_token, "another", Scopes::PLAY, now_ms(), 5_000),
        Err(TokenError::WrongBroadcast)
    );

    // A viewer that does not relay: PLAY only.
    let player = h.join(&b, &viewer_jwt("bob", &b), "", 0).await.unwrap();
    let claims = v
        .verify(&player.chunk_token, &b, Scopes::PLAY, now_ms(), 5_000)
        .unwrap();
    assert_eq!(claims.peer_id, player.peer_id);
    assert_eq!(
        v.verify(&player.chunk_token, &b, Scopes::RELAY, now_ms(), 5_000),
        Err(TokenError::MissingScope)
    );
    // A token is useless with a verifier that lacks the control plane's key.
    assert!(matches!(
        TokenVerifier::new().verify(&player.chunk_token, &b, Scopes::PLAY, now_ms(), 0),
        Err(TokenError::UnknownKeyId(_))
    ));

    // Heartbeats carry the key sets; no renewal long before expiry.
    let hb = h.heartbeat(&player.session_id).await;
    assert!(hb.active);
    assert!(hb.chunk_token.is_empty());
    assert_eq!(hb.token_expires_at_unix_ms, player.token_expires_at_unix_ms);
    assert_eq!(hb.token_keys, relay.token_keys);
    assert_eq!(hb.chunk_keys, vec![node.chunk_key.clone()]);
    assert!(hb.revoked_peer_ids.is_empty());
    h.shutdown().await;
}

async fn heartbeat_renews_token_near_expiry(store: Store) {
    // 2 s tokens: renewed once less than 1 s is left.
    let h = Harness::start_with(store, Duration::from_secs(2), Duration::from_secs(5)).await;
    let _node = FakeNode::register(&h, "edge", 1).await;
    let b = h.live_broadcast("renew", true).await;
    let j = h.join(&b, "", "127.0.0.1:7002", 2000).await.unwrap();
    let (_, first) = peek_unverified(&j.chunk_token).unwrap();
    assert_eq!(first.expires_at_ms - first.issued_at_ms, 2_000);
    let v = verifier(&j.token_keys);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let renewed = loop {
        let hb = h.heartbeat(&j.session_id).await;
        assert!(hb.active);
        if !hb.chunk_token.is_empty() {
            break hb;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "token never renewed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let claims = v
        .verify(
            &renewed.chunk_token,
            &b,
            Scopes::PLAY | Scopes::RELAY,
            now_ms(),
            5_000,
        )
        .unwrap();
    assert_eq!(claims.peer_id, j.peer_id);
    assert_eq!(claims.scopes, first.scopes);
    // Renewals keep the key the session joined with.
    assert_eq!(claims.holder_key, first.holder_key);
    assert!(claims.expires_at_ms > first.expires_at_ms);
    assert_eq!(
        i64::try_from(claims.expires_at_ms).unwrap(),
        renewed.token_expires_at_unix_ms
    );
    // Right after a renewal, no new token.
    let hb = h.heartbeat(&j.session_id).await;
    assert!(
        hb.chunk_token.is_empty() || hb.token_expires_at_unix_ms > renewed.token_expires_at_unix_ms
    );
    h.shutdown().await;
}

async fn revoke_viewer_by_subject_and_session(store: Store) {
    let h = Harness::start(store).await;
    let mut node = FakeNode::register(&h, "edge", 3).await;
    let b = h.live_broadcast("revoke", false).await;
    // Alice relays (big upload): Bob's parents are Alice.
    let alice = h
        .join(&b, &viewer_jwt("alice", &b), "127.0.0.1:7003", 100_000)
        .await
        .unwrap();
    let bob = h.join(&b, &viewer_jwt("bob", &b), "", 0).await.unwrap();
    assert!(
        bob.parents
            .iter()
            .all(|p| p.peer.as_ref().is_some_and(|r| r.peer_id == alice.peer_id)),
        "{:?}",
        bob.parents
    );
    let mut admin = h.admin();

    // Argument checks.
    for (subject, session) in [("", ""), ("alice", "x")] {
        let e = admin
            .revoke_viewer(RevokeViewerRequest {
                broadcast_id: b.clone(),
                subject: subject.into(),
                session_id: session.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    }
    let e = admin
        .revoke_viewer(RevokeViewerRequest {
            broadcast_id: b.clone(),
            subject: "mallory".into(),
            session_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let r = admin
        .revoke_viewer(RevokeViewerRequest {
            broadcast_id: b.clone(),
            subject: "alice".into(),
            session_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.revoked_sessions, 1);

    // Alice: inactive, no renewal.
    let hb = h.heartbeat(&alice.session_id).await;
    assert!(!hb.active);
    assert!(hb.chunk_token.is_empty());
    // The node is told to drop her at once.
    let revoke = node
        .wait_for(|c| match c {
            Command::Revoke(r) => Some(r),
            _ => None,
        })
        .await;
    assert_eq!(revoke.broadcast_id, b);
    assert_eq!(revoke.peer_ids, vec![alice.peer_id]);
    // Bob is told through his heartbeat, and no longer has Alice as a parent.
    let hb = h.heartbeat(&bob.session_id).await;
    assert!(hb.active);
    assert_eq!(hb.revoked_peer_ids, vec![alice.peer_id]);
    assert!(
        hb.parents
            .iter()
            .all(|p| p.peer.as_ref().is_none_or(|r| r.peer_id != alice.peer_id)),
        "{:?}",
        hb.parents
    );
    // She cannot join again with her old credential (issued before the revocation)...
    let e = h
        .join(&b, &viewer_jwt("alice", &b), "", 0)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(e.message().contains("revoked"), "{}", e.message());
    let old_iat = ed_jwt(
        &json!({"sub": "alice", "broadcast": b, "exp": now_secs() + 60, "iat": now_secs() - 10}),
    );
    let e = h.join(&b, &old_iat, "", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // ...but one the broadcaster mints after it is accepted.
    let fresh = ed_jwt(
        &json!({"sub": "alice", "broadcast": b, "exp": now_secs() + 60, "iat": now_secs() + 2}),
    );
    let again = h.join(&b, &fresh, "", 0).await.unwrap();
    assert_ne!(again.peer_id, alice.peer_id);
    // Revoking her again ends that session too.
    let r = admin
        .revoke_viewer(RevokeViewerRequest {
            broadcast_id: b.clone(),
            subject: "alice".into(),
            session_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.revoked_sessions, 1);
    let revoke = node
        .wait_for(|c| match c {
            Command::Revoke(r) => Some(r),
            _ => None,
        })
        .await;
    assert_eq!(revoke.peer_ids, vec![again.peer_id]);
    // Then nothing is left to revoke.
    let e = admin
        .revoke_viewer(RevokeViewerRequest {
            broadcast_id: b.clone(),
            subject: "alice".into(),
            session_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // By session.
    let r = admin
        .revoke_viewer(RevokeViewerRequest {
            broadcast_id: b.clone(),
            subject: String::new(),
            session_id: bob.session_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.revoked_sessions, 1);
    assert!(!h.heartbeat(&bob.session_id).await.active);
    let revoke = node
        .wait_for(|c| match c {
            Command::Revoke(r) => Some(r),
            _ => None,
        })
        .await;
    assert_eq!(revoke.peer_ids, vec![bob.peer_id]);

    // A reopened command stream replays the recent revocations after the ingest.
    let mut edge = h.edge();
    let mut replay = edge
        .commands(CommandsRequest {
            node_id: node.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while got.len() < 3 {
        let c = tokio::time::timeout(PATIENCE, replay.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        got.push(c.command.unwrap());
    }
    assert!(matches!(&got[0], Command::Keys(_)));
    assert!(matches!(&got[1], Command::Ingest(i) if i.broadcast_id == b));
    let Command::Revoke(r) = &got[2] else {
        panic!("expected a revoke replay, got {:?}", got[2]);
    };
    let mut ids = r.peer_ids.clone();
    ids.sort_unstable();
    let mut want = vec![alice.peer_id, again.peer_id, bob.peer_id];
    want.sort_unstable();
    assert_eq!(ids, want);

    // Unknown broadcast.
    let e = admin
        .revoke_viewer(RevokeViewerRequest {
            broadcast_id: "nope".into(),
            subject: "alice".into(),
            session_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    h.shutdown().await;
}

async fn reported_peer_is_never_a_parent_again(store: Store) {
    let h = Harness::start(store).await;
    let _node = FakeNode::register(&h, "edge", 5).await;
    let b = h.live_broadcast("polluted", true).await;
    let polluter = h.join(&b, "", "127.0.0.1:7010", 100_000).await.unwrap();
    // Three victims, each calling from its own address.
    let mut victims = Vec::new();
    for i in 2..=4u8 {
        let mut v = h.viewer_from([127, 0, 0, i]).await;
        let j = v
            .join(JoinRequest {
                holder_key: vec![7; 32],
                broadcast_id: b.clone(),
                client_version: "rights-test".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        victims.push((v, j));
    }
    let victim = victims[0].1.clone();
    let is_polluter = |p: &starling_proto::v1::SubstreamParent| {
        p.peer
            .as_ref()
            .is_some_and(|r| r.peer_id == polluter.peer_id)
    };
    for (_, v) in &victims {
        assert!(v.parents.iter().all(is_polluter));
    }

    let mut viewer = h.viewer();
    // Refusals.
    let e = viewer
        .report_peer(ReportPeerRequest {
            session_id: victim.session_id.clone(),
            peer_id: victim.peer_id,
            reason: "self".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = viewer
        .report_peer(ReportPeerRequest {
            session_id: "unknown-session".into(),
            peer_id: polluter.peer_id,
            reason: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Reports from two distinct addresses are not enough; the third excludes it.
    for (n, (client, v)) in victims.iter_mut().enumerate() {
        client
            .report_peer(ReportPeerRequest {
                session_id: v.session_id.clone(),
                peer_id: polluter.peer_id,
                reason: "chunk 12: bad signature".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        if n < 2 {
            let hb = h.heartbeat(&victim.session_id).await;
            assert!(hb.parents.iter().all(is_polluter), "{:?}", hb.parents);
        }
    }
    // The victim is re-parented away from it...
    let hb = h.heartbeat(&victim.session_id).await;
    assert!(!hb.parents.iter().any(is_polluter), "{:?}", hb.parents);
    // ...and nobody gets it as a parent any more, even with free slots.
    for _ in 0..5 {
        let j = h.join(&b, "", "", 0).await.unwrap();
        assert!(!j.parents.iter().any(is_polluter), "{:?}", j.parents);
        let p = viewer
            .reparent(starling_proto::v1::ReparentRequest {
                session_id: j.session_id.clone(),
                substream: 0,
                exclude_peer_ids: vec![],
                unreachable_peer_ids: vec![],
            })
            .await
            .unwrap()
            .into_inner()
            .parent
            .unwrap();
        assert!(!is_polluter(&p));
    }
    // The polluter itself still plays (it is only never a parent).
    assert!(h.heartbeat(&polluter.session_id).await.active);
    h.shutdown().await;
}

async fn token_keys_rotate_without_dropping_anyone(store: Store) {
    let replica = store.clone();
    let h = Harness::start_with(store, Duration::from_secs(120), Duration::from_millis(100)).await;
    let mut node = FakeNode::register(&h, "edge", 9).await;
    assert_eq!(node.token_keys.len(), 1);
    let old_key = node.token_keys[0].clone();
    let b = h.live_broadcast("rotate", true).await;
    let before = h.join(&b, "", "", 0).await.unwrap();

    // Another replica on the same database rotates the key.
    let now = i64::try_from(now_ms()).unwrap();
    let other = TokenKeys::load(&replica, Duration::from_secs(120), true, now)
        .await
        .unwrap();
    // The new key is published at once but does not sign yet (SIGN_LEAD).
    assert_eq!(other.signing_key_id(), old_key.key_id);
    let published = other.public_keys();
    assert_eq!(published.len(), 2);
    let new_id = published[1].key_id;
    assert_ne!(new_id, old_key.key_id);

    // This control plane picks it up and pushes both keys to the node, the signing
    // (old) key first.
    let keys = node
        .wait_for(|c| match c {
            Command::Keys(k) if k.token_keys.len() == 2 => Some(k.token_keys),
            _ => None,
        })
        .await;
    assert_eq!(keys[0], old_key);
    assert_eq!(keys[1].key_id, new_id);
    // Viewers are told both keys before any token signed with the new one exists.
    let after = h.join(&b, "", "", 0).await.unwrap();
    assert_eq!(after.token_keys, keys);
    assert_eq!(
        peek_unverified(&after.chunk_token).unwrap().0,
        old_key.key_id
    );

    // Once the lead has passed, the new key signs; tokens signed by either verify with
    // the published set.
    let signing_at = now + i64::try_from(SIGN_LEAD.as_millis()).unwrap();
    assert!(other.refresh(&replica, signing_at).await.unwrap());
    assert_eq!(other.signing_key_id(), new_id);
    let fresh = other
        .issue(&b, 77, Scopes::PLAY, [7; 32], signing_at)
        .expect("sign with the new key");
    assert_eq!(peek_unverified(&fresh.token).unwrap().0, new_id);
    let v = verifier(&other.public_keys());
    let at = u64::try_from(signing_at).unwrap();
    v.verify(&before.chunk_token, &b, Scopes::PLAY, at, 0)
        .unwrap();
    v.verify(&fresh.token, &b, Scopes::PLAY, at, 0).unwrap();

    // After one maximum token lifetime the old key is no longer published.
    let later = now + i64::try_from(RETIRE_AFTER.as_millis()).unwrap() + 1;
    assert!(other.refresh(&replica, later).await.is_ok());
    let ids: Vec<u32> = other.public_keys().iter().map(|k| k.key_id).collect();
    assert_eq!(ids, vec![new_id]);
    // Loading again (a restart) without rotating keeps the signing key.
    let again = TokenKeys::load(&replica, Duration::from_secs(120), false, later)
        .await
        .unwrap();
    assert_eq!(again.signing_key_id(), new_id);
    h.shutdown().await;
}

on_both_backends!(
    admin_calls_need_admin_credentials,
    viewer_credentials_on_join,
    jwt_audience_issuer_and_lifetime_are_required,
    join_issues_verifiable_chunk_token,
    heartbeat_renews_token_near_expiry,
    revoke_viewer_by_subject_and_session,
    reported_peer_is_never_a_parent_again,
    token_keys_rotate_without_dropping_anyone,
);
