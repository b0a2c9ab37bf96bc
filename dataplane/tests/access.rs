//! Access control compatible with the original platform: `/setup` sets the permit
//! cookie, interactive circuits need it, inference circuits need a bearer JWT naming
//! them, the IP allowlist applies (with trusted proxies), and refusals are JSON with
//! the request ID and nothing about the circuit.

mod common;

use appproxy_dataplane::auth::{permit_value, sign_hs256, PermitDigest};
use common::{Client, Upstream, Worker, WorkerOpts};

const CIRCUIT: &str = "c0a8f5d2-1111-4222-8333-444455556666";
const USER: &str = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";
const SECRETS: &str =
    "[secrets]\njwt_secret = \"jwt-key\"\npermit_secret = \"PERMIT_HASH_SECRET\"\n";

fn worker(up: &Upstream, circuit_extra: &str, worker_extra: &str) -> Worker {
    Worker::start(WorkerOpts {
        upstreams: vec![up.addr],
        extra: SECRETS.into(),
        worker_extra: worker_extra.into(),
        circuit_extra: circuit_extra.into(),
        ..Default::default()
    })
}

fn refused(r: &common::Response, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.json()["code"], code);
    assert_eq!(
        r.json()["request_id"],
        r.header("x-backend-request-id").expect("id")
    );
    assert!(
        !r.text().contains(CIRCUIT) && !r.text().contains(USER),
        "refusals name no circuit detail"
    );
}

#[test]
fn interactive_circuits_need_the_permit_from_setup() {
    let up = Upstream::start();
    let w = worker(
        &up,
        &format!("open_to_public = false\napp_mode = \"interactive\"\nuser_id = \"{USER}\""),
        "hostname = \"proxy.test\"\napi_port = {AUX_PORT}",
    );
    let mut c = Client::connect(w.addr());
    refused(&c.get("/lab", ""), 401, "E20004");
    refused(
        &c.get("/lab", "Cookie: appproxy_permit=wrong\r\n"),
        401,
        "E20005",
    );
    assert_eq!(up.count(), 0, "refused requests never reach the app");
    // A genuine CORS preflight is let through (browsers send it without the cookie);
    // an OPTIONS that is not one needs the permit like any other request.
    c.send(b"OPTIONS /lab HTTP/1.1\r\nHost: t\r\nOrigin: http://proxy.test\r\nAccess-Control-Request-Method: PUT\r\n\r\n");
    assert_eq!(c.response().status, 200);
    c.send(b"OPTIONS /lab HTTP/1.1\r\nHost: t\r\n\r\n");
    refused(&c.response(), 401, "E20004");

    // /setup with the coordinator's token: a redirect and the cookie.
    let token = sign_hs256(
        &serde_json::json!({"id": "t", "version": "v2", "redirect": "lab/tree", "circuit": CIRCUIT}),
        "jwt-key",
    );
    let mut api = Client::connect(std::net::SocketAddr::from(([127, 0, 0, 1], w.aux_port)));
    let r = api.get(
        &format!("/setup?token={token}"),
        "X-Backend-Request-ID: setup-1\r\n",
    );
    assert_eq!(r.status, 302, "{}", r.text());
    assert_eq!(
        r.header("location").map(str::to_owned),
        Some(format!("http://proxy.test:{}/lab/tree", w.port))
    );
    assert_eq!(r.header("x-backend-request-id"), Some("setup-1"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let expected = permit_value(
        "PERMIT_HASH_SECRET",
        &USER.parse().expect("uuid"),
        PermitDigest::Sha256,
    );
    assert_eq!(
        expected,
        "YmZkY2NmYTQ5ZWNjODMwYmIyZTBmOTRiYTFjNGEzYzdkYzAwOGUyZjY3ODY4NTQzNDA5MTlkNzE1YjlmZTg1YQ=="
    );
    let set_cookie = r.header("set-cookie").expect("cookie").to_owned();
    assert_eq!(
        set_cookie,
        format!("appproxy_permit=\"{expected}\"; HttpOnly; Max-Age=604800; Path=/; SameSite=Lax")
    );
    // The cookie opens the circuit, quoted (as set) or not.
    let quoted = set_cookie.split(';').next().expect("pair").to_owned();
    assert_eq!(
        c.get("/lab", &format!("Cookie: other=1; {quoted}\r\n"))
            .status,
        200
    );
    // The app gets its own cookies, never the permit: a cookie goes to every port
    // and subdomain of its domain, so any app a user visits (another user's public
    // one too) would otherwise get a credential to all of that user's circuits.
    let seen = up.last();
    assert_eq!(seen.headers_named("cookie"), vec!["other=1"], "{seen:?}");
    assert_eq!(
        c.get("/lab", &format!("Cookie: appproxy_permit={expected}\r\n"))
            .status,
        200
    );
    let seen = up.last();
    assert!(seen.headers_named("cookie").is_empty(), "{seen:?}");
    // A token signed with another key, or for an unknown circuit, is refused.
    let forged = sign_hs256(
        &serde_json::json!({"circuit": CIRCUIT, "redirect": ""}),
        "not-the-key",
    );
    let mut api = Client::connect(std::net::SocketAddr::from(([127, 0, 0, 1], w.aux_port)));
    assert_eq!(api.get(&format!("/setup?token={forged}"), "").status, 401);
    let other = sign_hs256(
        &serde_json::json!({"circuit": uuid::Uuid::new_v4().to_string()}),
        "jwt-key",
    );
    let mut api = Client::connect(std::net::SocketAddr::from(([127, 0, 0, 1], w.aux_port)));
    assert_eq!(api.get(&format!("/setup?token={other}"), "").status, 404);
}

#[test]
fn inference_circuits_need_a_bearer_token_for_them() {
    let up = Upstream::start();
    let w = worker(
        &up,
        "open_to_public = false\napp_mode = \"inference\"",
        "api_port = {AUX_PORT}",
    );
    let mut c = Client::connect(w.addr());
    refused(&c.get("/v1/models", ""), 401, "E20006");
    let good = sign_hs256(
        &serde_json::json!({"id": CIRCUIT, "exp": 4_000_000_000u64}),
        "jwt-key",
    );
    assert_eq!(
        c.get("/v1/models", &format!("Authorization: Bearer {good}\r\n"))
            .status,
        200
    );
    assert_eq!(
        c.get(
            "/v1/models",
            &format!("Authorization: BackendAI {good}\r\n")
        )
        .status,
        200
    );
    let other = sign_hs256(
        &serde_json::json!({"id": uuid::Uuid::new_v4().to_string()}),
        "jwt-key",
    );
    refused(
        &c.get("/v1/models", &format!("Authorization: Bearer {other}\r\n")),
        401,
        "E20009",
    );
    let expired = sign_hs256(&serde_json::json!({"id": CIRCUIT, "exp": 1}), "jwt-key");
    refused(
        &c.get(
            "/v1/models",
            &format!("Authorization: Bearer {expired}\r\n"),
        ),
        401,
        "E20008",
    );
    // /setup refuses inference circuits.
    let token = sign_hs256(
        &serde_json::json!({"circuit": CIRCUIT, "redirect": ""}),
        "jwt-key",
    );
    let mut api = Client::connect(std::net::SocketAddr::from(([127, 0, 0, 1], w.aux_port)));
    let r = api.get(&format!("/setup?token={token}"), "");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "E20011");
}

#[test]
fn ip_allowlist_with_and_without_trusted_proxies() {
    let up = Upstream::start();
    // Direct peers: 127.0.0.1 is not in the list.
    let w = worker(&up, "allowed_client_ips = \"10.1.2.0/24\"", "");
    let mut c = Client::connect(w.addr());
    refused(
        &c.get("/", "X-Forwarded-For: 10.1.2.3\r\n"),
        403,
        "forbidden",
    );
    drop(w);
    // Through a trusted proxy, its one X-Forwarded-For address is the client.
    let w = worker(
        &up,
        "allowed_client_ips = \"10.1.2.0/24\"",
        "trusted_proxies = [\"127.0.0.1/32\"]",
    );
    let mut c = Client::connect(w.addr());
    assert_eq!(c.get("/", "X-Forwarded-For: 10.1.2.3\r\n").status, 200);
    assert_eq!(
        up.last().header("x-forwarded-for"),
        Some("10.1.2.3, 127.0.0.1")
    );
    refused(
        &c.get("/", "X-Forwarded-For: 10.9.9.9\r\n"),
        403,
        "forbidden",
    );
    let mut c = Client::connect(w.addr());
    let r = c.get("/", "X-Forwarded-For: 10.1.2.3, 10.1.2.4\r\n");
    assert_eq!(
        r.status, 400,
        "a chain from a trusted one-hop proxy is refused"
    );
}
