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

/// `/setup`, the step between the manager's creation and the app's first request,
/// is traced as the frontends are (the client's `traceparent` continued), its access
/// line names the circuit and user its token named, and a refusal says why under
/// its ID. Before, the line had neither circuit nor trace, and a refused token
/// left only a status.
#[test]
fn setup_is_traced_names_its_circuit_and_says_why_it_refused() {
    const INCOMING: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let up = Upstream::start();
    let w = worker(
        &up,
        &format!("open_to_public = false\napp_mode = \"interactive\"\nuser_id = \"{USER}\""),
        "hostname = \"proxy.test\"\napi_port = {AUX_PORT}",
    );
    let api = std::net::SocketAddr::from(([127, 0, 0, 1], w.aux_port));
    let token = sign_hs256(
        &serde_json::json!({"id": "t", "version": "v2", "redirect": "lab", "circuit": CIRCUIT}),
        "jwt-key",
    );
    let r = Client::connect(api).get(
        &format!("/setup?token={token}"),
        &format!("X-Backend-Request-ID: setup-traced\r\ntraceparent: {INCOMING}\r\n"),
    );
    assert_eq!(r.status, 302, "{}", r.text());
    let line = w.wait_access_line("setup-traced");
    assert_eq!(
        line["trace_id"], "0af7651916cd43dd8448eb211c80319c",
        "{line}"
    );
    assert_eq!(line["parent_span_id"], "b7ad6b7169203331", "{line}");
    assert_eq!(line["circuit"], CIRCUIT, "{line}");
    assert_eq!(line["user_id"], USER, "{line}");
    // A token another key signed: refused, and the line says why.
    let forged = sign_hs256(
        &serde_json::json!({"id": "t", "version": "v2", "circuit": CIRCUIT}),
        "another-key",
    );
    let r = Client::connect(api).get(
        &format!("/setup?token={forged}"),
        "X-Backend-Request-ID: setup-forged\r\n",
    );
    refused(&r, 401, "E20008");
    assert_eq!(w.wait_access_line("setup-forged")["status"], 401);
    let why = w.wait_log("the refusal's reason", |v| {
        v["request_id"] == "setup-forged" && v["message"] == "api request refused"
    });
    assert_eq!(why[0]["code"], "E20008", "{}", why[0]);
    assert!(why[0]["error"].is_string(), "{}", why[0]);
    assert!(!w.log_text().contains(&forged), "the token was logged");
    // A head refused before it was read whole (two `Host` fields) is in the
    // client's trace too.
    let mut c = Client::connect(api);
    c.send(
        format!("GET /setup HTTP/1.1\r\nHost: a\r\nHost: b\r\nX-Backend-Request-ID: setup-bad-head\r\ntraceparent: {INCOMING}\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(c.response().status, 400);
    let line = w.wait_access_line("setup-bad-head");
    assert_eq!(
        line["trace_id"], "0af7651916cd43dd8448eb211c80319c",
        "{line}"
    );
    assert_eq!(line["parent_span_id"], "b7ad6b7169203331", "{line}");
    let why = w.wait_log("the bad head's refusal", |v| {
        v["request_id"] == "setup-bad-head" && v["message"] == "api request refused"
    });
    assert_eq!(
        why[0]["trace_id"], "0af7651916cd43dd8448eb211c80319c",
        "{}",
        why[0]
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
    // A genuine CORS preflight (browsers send it without the cookie) is answered by
    // the worker, never by the app: from an origin not in `allowed_origins`, 403 as
    // the request it asks about would get; an OPTIONS that is not one needs the
    // permit like any other request.
    c.send(b"OPTIONS /lab HTTP/1.1\r\nHost: t\r\nOrigin: http://proxy.test\r\nAccess-Control-Request-Method: PUT\r\n\r\n");
    refused(&c.response(), 403, "cross_origin");
    c.send(b"OPTIONS /lab HTTP/1.1\r\nHost: t\r\n\r\n");
    refused(&c.response(), 401, "E20004");
    assert_eq!(up.count(), 0, "no preflight reaches the app");

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
    // Its access line, without the token (the query is never on a line).
    let line = w.wait_access_line("setup-1");
    assert_eq!(line["status"], 302, "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["path"], "/setup", "{line}");
    assert!(!w.log_text().contains(&token), "the token was logged");
    // A head the API port cannot take is answered under the client's ID, with its
    // access line, as on the frontends.
    let mut big = Client::connect(std::net::SocketAddr::from(([127, 0, 0, 1], w.aux_port)));
    let refused_big = big.get(
        "/setup",
        &format!(
            "X-Backend-Request-ID: setup-431\r\nX-Pad: {}\r\n",
            "a".repeat(20_000)
        ),
    );
    assert_eq!(refused_big.status, 431, "{}", refused_big.text());
    assert_eq!(
        refused_big.header("x-backend-request-id"),
        Some("setup-431")
    );
    let line = w.wait_access_line("setup-431");
    assert_eq!(line["status"], 431, "{line}");
    assert_eq!(line["path"], "-", "{line}");
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
    let user: uuid::Uuid = USER.parse().expect("uuid");
    assert_eq!(
        set_cookie,
        format!(
            "appproxy_permit_{}=\"{expected}\"; HttpOnly; Max-Age=604800; Path=/; SameSite=Lax",
            user.simple()
        )
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
    // An expired link (the coordinator's carry an `exp`) hands out no permit.
    let expired = sign_hs256(
        &serde_json::json!({"id": "t", "version": "v2", "redirect": "lab/tree", "circuit": CIRCUIT, "exp": 1_000_000_000u64}),
        "jwt-key",
    );
    let mut api = Client::connect(std::net::SocketAddr::from(([127, 0, 0, 1], w.aux_port)));
    let r = api.get(&format!("/setup?token={expired}"), "");
    assert_eq!((r.status, r.json()["code"].as_str()), (401, Some("E20008")));
    assert_eq!(r.header("set-cookie"), None);
    let other = sign_hs256(
        &serde_json::json!({"circuit": uuid::Uuid::new_v4().to_string()}),
        "jwt-key",
    );
    let mut api = Client::connect(std::net::SocketAddr::from(([127, 0, 0, 1], w.aux_port)));
    assert_eq!(api.get(&format!("/setup?token={other}"), "").status, 404);
}

/// A page can send a user's browser to another user's `/setup` link (the other
/// user's own, from a launch of theirs). With one cookie name for every user, that
/// user's permit replaced the browser's: its user was locked out of their own
/// circuits (401 E20005) until they went through their own `/setup` again. Now each
/// user's permit has a cookie of its own, and the link adds the other's beside it.
#[test]
fn another_users_setup_link_does_not_lock_a_user_out() {
    use std::collections::BTreeMap;
    let up = Upstream::start();
    let other_port = appproxy_test_support::free_port();
    let other_circuit = "c0a8f5d2-2222-4222-8333-444455556666";
    let other_user = "9b2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";
    let w = worker(
        &up,
        &format!(
            "open_to_public = false\napp_mode = \"interactive\"\nuser_id = \"{USER}\"\n\n[[circuits]]\nid = \"{other_circuit}\"\napp = \"test\"\nport = {other_port}\nopen_to_public = false\napp_mode = \"interactive\"\nuser_id = \"{other_user}\"\nroute_info = [{{ session_id = \"5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b\", kernel_host = \"{}\", kernel_port = {} }}]",
            up.addr.ip(),
            up.addr.port()
        ),
        "hostname = \"proxy.test\"\napi_port = {AUX_PORT}",
    );
    // The browser's jar for the worker's host: a cookie of the same name (and the
    // same path and domain) replaces the one it holds.
    let mut jar: BTreeMap<String, String> = BTreeMap::new();
    let mut setup = |circuit: &str| {
        let token = sign_hs256(
            &serde_json::json!({"id": "t", "version": "v2", "redirect": "lab", "circuit": circuit}),
            "jwt-key",
        );
        let mut api = Client::connect(std::net::SocketAddr::from(([127, 0, 0, 1], w.aux_port)));
        let r = api.get(&format!("/setup?token={token}"), "");
        assert_eq!(r.status, 302, "{}", r.text());
        let set = r.header("set-cookie").expect("cookie").to_owned();
        let pair = set.split(';').next().expect("pair");
        let (name, value) = pair.split_once('=').expect("name=value");
        jar.insert(name.to_owned(), value.to_owned());
        jar.iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let own = setup(CIRCUIT);
    let mut c = Client::connect(w.addr());
    assert_eq!(c.get("/lab", &format!("Cookie: {own}\r\n")).status, 200);
    // The other user's link, followed by the same browser.
    let both = setup(other_circuit);
    let r = c.get("/lab", &format!("Cookie: {both}\r\n"));
    assert_eq!(r.status, 200, "the user is locked out: {}", r.text());
    // Neither permit reaches the app.
    assert!(
        up.last().headers_named("cookie").is_empty(),
        "{:?}",
        up.last()
    );
    // The other user's circuit takes the other permit (the link's purpose), not the
    // user's own.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], other_port));
    assert_eq!(
        Client::connect(addr)
            .get("/lab", &format!("Cookie: {both}\r\n"))
            .status,
        200
    );
    let r = Client::connect(addr).get("/lab", &format!("Cookie: {own}\r\n"));
    refused(&r, 401, "E20005");
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
    // Not valid before its `nbf` (RFC 7519 §4.1.5); valid once it is past.
    let early = sign_hs256(
        &serde_json::json!({"id": CIRCUIT, "nbf": 4_000_000_000u64}),
        "jwt-key",
    );
    let r = c.get("/v1/models", &format!("Authorization: Bearer {early}\r\n"));
    refused(&r, 401, "E20008");
    assert_eq!(r.json()["error"], "token not yet valid");
    let begun = sign_hs256(&serde_json::json!({"id": CIRCUIT, "nbf": 1}), "jwt-key");
    assert_eq!(
        c.get("/v1/models", &format!("Authorization: Bearer {begun}\r\n"))
            .status,
        200
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
    // Through a trusted proxy, the X-Forwarded-For address it gave is the client.
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
}

/// Behind a chain of proxies the client is the address the nearest untrusted hop
/// gave: `X-Forwarded-For` read from its right end past every trusted proxy's
/// address (a CDN before the balancer; a client behind its own forward proxy, whose
/// balancer appended what it saw), never the entries left of it (the client's own
/// words). The allowlist, `X-Real-IP` and the access line name that client; the
/// whole list goes on to the app. A list that cannot be read that far is refused.
/// Table: the trusted peer's fields, the client named (`None`: 400, nothing sent).
#[test]
fn x_forwarded_for_is_read_from_its_right_end_past_trusted_proxies() {
    let up = Upstream::start();
    let w = worker(
        &up,
        "allowed_client_ips = \"10.1.2.0/24\"",
        "trusted_proxies = [\"127.0.0.1/32\", \"192.0.2.0/24\"]",
    );
    let cdn_chain = |n: usize| vec!["192.0.2.7"; n].join(", ");
    let table: Vec<(String, Option<&str>)> = vec![
        ("10.1.2.3".into(), Some("10.1.2.3")),
        ("10.9.9.9, 10.1.2.3".into(), Some("10.1.2.3")),
        // A spoofed entry on the left does not get past the allowlist.
        ("10.1.2.3, 10.9.9.9".into(), Some("10.9.9.9")),
        ("junk, 10.1.2.3".into(), Some("10.1.2.3")),
        // Through a trusted CDN, on one line or two.
        ("10.1.2.3, 192.0.2.7".into(), Some("10.1.2.3")),
        (
            "10.1.2.3\r\nX-Forwarded-For: 192.0.2.7".into(),
            Some("10.1.2.3"),
        ),
        ("::ffff:10.1.2.3, 192.0.2.7".into(), Some("10.1.2.3")),
        // Sixteen trusted addresses are read past; a seventeenth is too many.
        (format!("10.1.2.3, {}", cdn_chain(16)), Some("10.1.2.3")),
        (format!("10.1.2.3, {}", cdn_chain(17)), None),
        // Every address a trusted proxy's: the leftmost (not admitted here).
        (cdn_chain(2), Some("192.0.2.7")),
        ("10.1.2.3, unknown".into(), None),
        ("10.1.2.3:5000".into(), None),
        ("10.1.2.3,".into(), None),
        ("[2001:db8::1]".into(), None),
    ];
    for (i, (list, client)) in table.iter().enumerate() {
        let id = format!("xff-{i}");
        let before = up.count();
        let r = Client::connect(w.addr()).get(
            "/",
            &format!("X-Backend-Request-ID: {id}\r\nX-Forwarded-For: {list}\r\n"),
        );
        let Some(client) = client else {
            assert_eq!(r.status, 400, "{list}: {}", r.text());
            assert_eq!(up.count(), before, "{list}: nothing reaches the app");
            continue;
        };
        assert_eq!(w.wait_access_line(&id)["client"], *client, "{list}");
        if !client.starts_with("10.1.2.") {
            refused(&r, 403, "forbidden");
            continue;
        }
        assert_eq!(r.status, 200, "{list}: {}", r.text());
        let seen = up.last();
        assert_eq!(seen.header("x-real-ip"), Some(*client), "{list}");
        assert_eq!(
            seen.headers_named("x-forwarded-for"),
            vec![format!(
                "{}, 127.0.0.1",
                list.replace("\r\nX-Forwarded-For: ", ", ")
            )],
            "{list}"
        );
    }
    // A WebSocket handshake names the same client (the app answers it with a 200
    // here; what matters is the head it got).
    let r = Client::connect(w.addr()).get(
        "/ws",
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Forwarded-For: 10.9.9.9, 10.1.2.3, 192.0.2.7\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.last();
    assert_eq!(seen.header("upgrade"), Some("websocket"));
    assert_eq!(seen.header("x-real-ip"), Some("10.1.2.3"));
}

/// An allowlist whose every entry is invalid (a typo, a hostname) admits nobody:
/// skipping the bad entries must not leave an empty list, which means "everyone".
#[test]
fn an_allowlist_of_invalid_entries_admits_nobody() {
    let up = Upstream::start();
    for list in ["\"not-an-ip\"", "[\"localhost\", \"127.0.0.0/33\"]"] {
        let w = worker(&up, &format!("allowed_client_ips = {list}"), "");
        let mut c = Client::connect(w.addr());
        refused(&c.get("/", ""), 403, "forbidden");
        assert_eq!(up.count(), 0, "{list}: nothing reaches the app");
    }
    // A valid entry beside an invalid one: the valid one applies.
    let w = worker(&up, "allowed_client_ips = [\"nope\", \"127.0.0.1\"]", "");
    assert_eq!(Client::connect(w.addr()).get("/", "").status, 200);
}

/// An allowlist written as IPv4-mapped IPv6 networks admits the IPv4 clients they
/// name (the client's address is compared in its IPv4 form) and no others.
#[test]
fn an_allowlist_of_ipv4_mapped_networks_admits_their_ipv4_clients() {
    let up = Upstream::start();
    // The IPv4-mapped form of 127.0.0.0/8.
    let w = worker(&up, "allowed_client_ips = \"::ffff:127.0.0.0/104\"", "");
    assert_eq!(Client::connect(w.addr()).get("/", "").status, 200);
    let w = worker(&up, "allowed_client_ips = \"::ffff:10.0.0.0/104\"", "");
    refused(&Client::connect(w.addr()).get("/", ""), 403, "forbidden");
}

/// The permit as a browser sends it.
fn permit_cookie() -> String {
    format!(
        "Cookie: appproxy_permit=\"{}\"\r\n",
        permit_value(
            "PERMIT_HASH_SECRET",
            &USER.parse().expect("uuid"),
            PermitDigest::Sha256
        )
    )
}

const INTERACTIVE: &str = "open_to_public = false\napp_mode = \"interactive\"";

/// The two requests a hostile page makes with the victim's cookie: a WebSocket
/// handshake (a terminal, a kernel's channels) and a POST (a form, or `fetch`).
fn hostile(kind: &str, host: &str, fields: &str) -> Vec<u8> {
    match kind {
        "websocket" => format!(
            "GET /terminals/websocket/1 HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{fields}\r\n"
        ),
        _ => format!(
            "POST /api/kernels HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 9\r\n{fields}\r\nname=evil"
        ),
    }
    .into_bytes()
}

/// `(what, Host, Origin fields, admitted)` for a circuit addressed as
/// `proxy.test:{port}` (port mode: any `Host` reaches it).
fn origin_table(port: u16) -> Vec<(&'static str, String, String, bool)> {
    let o = |v: &str| format!("Origin: {v}\r\n");
    vec![
        (
            "null, the browser saying the page is the same origin (no-referrer forms)",
            format!("proxy.test:{port}"),
            "Origin: null\r\nSec-Fetch-Site: same-origin\r\n".into(),
            true,
        ),
        (
            "null from a sibling site",
            format!("proxy.test:{port}"),
            "Origin: null\r\nSec-Fetch-Site: same-site\r\n".into(),
            false,
        ),
        (
            "null, the same-origin word given twice",
            format!("proxy.test:{port}"),
            "Origin: null\r\nSec-Fetch-Site: same-origin\r\nSec-Fetch-Site: same-origin\r\n".into(),
            false,
        ),
        (
            "no Origin",
            format!("proxy.test:{port}"),
            String::new(),
            true,
        ),
        (
            "same origin",
            format!("proxy.test:{port}"),
            o(&format!("http://proxy.test:{port}")),
            true,
        ),
        (
            "same host and port, the other scheme (a TLS terminator in front)",
            format!("proxy.test:{port}"),
            o(&format!("https://proxy.test:{port}")),
            true,
        ),
        (
            "same origin in upper case",
            format!("Proxy.Test:{port}"),
            o(&format!("HTTP://PROXY.TEST:{port}")),
            true,
        ),
        (
            "default port left out of Host",
            "proxy.test".into(),
            o("https://proxy.test:443"),
            true,
        ),
        (
            "default port left out of both",
            "proxy.test".into(),
            o("https://proxy.test"),
            true,
        ),
        (
            "default port written in Host",
            "proxy.test:80".into(),
            o("http://proxy.test"),
            true,
        ),
        (
            "another subdomain (another app)",
            format!("term.apps.test:{port}"),
            o(&format!("http://evil.apps.test:{port}")),
            false,
        ),
        (
            "another host",
            format!("proxy.test:{port}"),
            o(&format!("http://evil.test:{port}")),
            false,
        ),
        (
            "another port (another app)",
            format!("proxy.test:{port}"),
            o(&format!("http://proxy.test:{}", port + 1)),
            false,
        ),
        (
            "default port where Host names one",
            format!("proxy.test:{port}"),
            o("http://proxy.test"),
            false,
        ),
        (
            "a non-default port where Host names the default",
            "proxy.test".into(),
            o("http://proxy.test:443"),
            false,
        ),
        (
            "null (sandboxed frame, data: URL)",
            format!("proxy.test:{port}"),
            o("null"),
            false,
        ),
        (
            "another scheme",
            format!("proxy.test:{port}"),
            o(&format!("ftp://proxy.test:{port}")),
            false,
        ),
        (
            "malformed: no scheme",
            format!("proxy.test:{port}"),
            o(&format!("proxy.test:{port}")),
            false,
        ),
        (
            "malformed: a path",
            format!("proxy.test:{port}"),
            o(&format!("http://proxy.test:{port}/")),
            false,
        ),
        (
            "malformed: userinfo",
            format!("proxy.test:{port}"),
            o(&format!("http://evil@proxy.test:{port}")),
            false,
        ),
        (
            "malformed: empty",
            format!("proxy.test:{port}"),
            "Origin:\r\n".into(),
            false,
        ),
        (
            "two Origin fields",
            format!("proxy.test:{port}"),
            format!("{0}{0}", o(&format!("http://proxy.test:{port}"))),
            false,
        ),
    ]
}

/// Sends one request on a fresh connection: the app's answer, or the proxy's 403.
fn send_one(w: &Worker, bytes: &[u8]) -> common::Response {
    let mut c = Client::connect(w.addr());
    c.send(bytes);
    c.response()
}

#[test]
fn permit_requests_from_another_origin_are_refused_before_the_app() {
    let up = Upstream::start();
    let w = worker(&up, &format!("{INTERACTIVE}\nuser_id = \"{USER}\""), "");
    let cookie = permit_cookie();
    let table = origin_table(w.port);
    let mut refusals = 0;
    // The refused rows first, on an app nobody reached yet: nothing reaches it,
    // not even a connection.
    for admitted in [false, true] {
        for kind in ["websocket", "post"] {
            for (what, host, origin, _) in table.iter().filter(|row| row.3 == admitted) {
                let before = up.count();
                let r = send_one(&w, &hostile(kind, host, &format!("{origin}{cookie}")));
                if admitted {
                    assert_eq!(r.status, 200, "{kind}, {what}: {}", r.text());
                    assert_eq!(up.count(), before + 1, "{kind}, {what}");
                } else {
                    assert_eq!(r.status, 403, "{kind}, {what}: {}", r.text());
                    refused(&r, 403, "cross_origin");
                    assert_eq!(
                        r.json()["error"],
                        "cross-origin request refused",
                        "{kind}, {what}"
                    );
                    refusals += 1;
                }
            }
        }
        if !admitted {
            assert_eq!(up.count(), 0, "refused requests reached the app");
            assert_eq!(
                up.connections.load(std::sync::atomic::Ordering::Relaxed),
                0,
                "refused requests opened a connection to the app"
            );
        }
    }
    // A cross-origin GET is refused too (a script's CORS fetch with the cookie); a
    // plain one (a navigation, a link) carries no Origin and passes.
    let mut c = Client::connect(w.addr());
    let r = c.get(
        "/api/contents",
        &format!("Origin: http://evil.test\r\n{cookie}"),
    );
    refused(&r, 403, "cross_origin");
    refusals += 1;
    assert_eq!(
        c.get("/api/contents", &cookie).status,
        200,
        "the connection goes on"
    );
    // The permit is checked first: without it, the answer is the usual 401.
    refused(&c.get("/", "Origin: http://evil.test\r\n"), 401, "E20004");
    // A genuine CORS preflight carries no cookie: the worker answers it, and from
    // an origin its guard refuses, with the same 403.
    c.send(b"OPTIONS /api/contents HTTP/1.1\r\nHost: t\r\nOrigin: http://evil.test\r\nAccess-Control-Request-Method: PUT\r\n\r\n");
    refused(&c.response(), 403, "cross_origin");
    refusals += 1;
    // Logged with what was refused, and counted as the proxy's own answers by code.
    let lines = w.wait_log("the refusal line", |v| {
        v["message"] == "cross-origin request refused" && v["origin"] == "http://evil.test"
    });
    assert!(
        lines[0]["host"] == "test" && lines[0]["request_id"].is_string(),
        "{}",
        lines[0]
    );
    common::eventually("the refusals are counted by code", || {
        w.admin_get("/metrics").text().contains(&format!(
            "appproxy_proxy_errors_by_code_total{{code=\"cross_origin\"}} {refusals}"
        ))
    });
}

#[test]
fn public_circuits_and_bearer_tokens_take_any_origin() {
    // No permit, no guard: a public app holds nothing a credential protects, and a
    // bearer token is never attached by a browser on its own.
    let up = Upstream::start();
    let w = worker(&up, "open_to_public = true", "");
    let table = origin_table(w.port);
    for kind in ["websocket", "post"] {
        for (what, host, origin, _) in &table {
            let r = send_one(&w, &hostile(kind, host, origin));
            assert_eq!(r.status, 200, "public, {kind}, {what}: {}", r.text());
        }
    }
    assert_eq!(up.count(), 2 * table.len());
    drop(w);
    let up = Upstream::start();
    let w = worker(&up, "open_to_public = false\napp_mode = \"inference\"", "");
    let bearer = format!(
        "Authorization: Bearer {}\r\n",
        sign_hs256(&serde_json::json!({"id": CIRCUIT}), "jwt-key")
    );
    for kind in ["websocket", "post"] {
        for (what, host, origin, _) in &table {
            let r = send_one(&w, &hostile(kind, host, &format!("{origin}{bearer}")));
            assert_eq!(r.status, 200, "inference, {kind}, {what}: {}", r.text());
        }
    }
    assert_eq!(up.count(), 2 * table.len());
}

#[test]
fn allowed_origins_are_admitted_exactly() {
    let up = Upstream::start();
    let w = worker(
        &up,
        &format!("{INTERACTIVE}\nuser_id = \"{USER}\""),
        "allowed_origins = [\"https://Console.example.com\", \"http://localhost:3000\"]",
    );
    let cookie = permit_cookie();
    let host = format!("proxy.test:{}", w.port);
    for (origin, admitted) in [
        ("https://console.example.com", true),
        ("https://console.example.com:443", true),
        ("HTTPS://CONSOLE.EXAMPLE.COM", true),
        ("http://localhost:3000", true),
        (&*format!("http://proxy.test:{}", w.port), true),
        ("http://console.example.com", false),
        ("https://console.example.com:8443", false),
        ("https://evil.console.example.com", false),
        ("http://localhost:3001", false),
        ("null", false),
    ] {
        for kind in ["websocket", "post"] {
            let before = up.count();
            let r = send_one(
                &w,
                &hostile(kind, &host, &format!("Origin: {origin}\r\n{cookie}")),
            );
            if admitted {
                assert_eq!(r.status, 200, "{kind}, {origin}: {}", r.text());
                assert_eq!(up.count(), before + 1);
            } else {
                refused(&r, 403, "cross_origin");
                assert_eq!(up.count(), before, "{kind}, {origin} reached the app");
            }
        }
    }
}

#[test]
fn the_forwarded_host_of_a_trusted_proxy_is_the_address() {
    // A balancer that rewrites Host says in X-Forwarded-Host what the browser asked
    // for; from any other peer that field is the client's word and counts for nothing.
    let cookie = permit_cookie();
    let fields = |origin: &str| {
        format!("X-Forwarded-Host: apps.example.com\r\nOrigin: {origin}\r\n{cookie}")
    };
    for (trusted, origin, admitted) in [
        (true, "https://apps.example.com", true),
        (true, "http://internal:1", false),
        (false, "https://apps.example.com", false),
        (false, "http://internal:1", true),
    ] {
        let up = Upstream::start();
        let w = worker(
            &up,
            &format!("{INTERACTIVE}\nuser_id = \"{USER}\""),
            if trusted {
                "trusted_proxies = [\"127.0.0.1/32\"]"
            } else {
                ""
            },
        );
        for kind in ["websocket", "post"] {
            let r = send_one(&w, &hostile(kind, "internal:1", &fields(origin)));
            let want = if admitted { 200 } else { 403 };
            assert_eq!(
                r.status,
                want,
                "trusted {trusted}, {kind}, {origin}: {}",
                r.text()
            );
        }
        assert_eq!(up.count(), if admitted { 2 } else { 0 });
    }
    // nginx's `$host` never carries the port: a forwarded host without one takes the
    // trusted proxy's `X-Forwarded-Port`, so a browser on a non-default port (as
    // port-mode circuits are) is its own origin there, and the default port is not.
    let up = Upstream::start();
    let w = worker(
        &up,
        &format!("{INTERACTIVE}\nuser_id = \"{USER}\""),
        "trusted_proxies = [\"127.0.0.1/32\"]",
    );
    for (forwarded, origin, admitted) in [
        (
            "X-Forwarded-Port: 8443\r\n",
            "https://apps.example.com:8443",
            true,
        ),
        (
            "X-Forwarded-Port: 8443\r\n",
            "https://apps.example.com",
            false,
        ),
        ("", "https://apps.example.com:8443", false),
        // A port the forwarded host names itself wins; two port fields are none.
        (
            "X-Forwarded-Port: 1\r\n",
            "https://apps.example.com:9443",
            true,
        ),
        (
            "X-Forwarded-Port: 8443\r\nX-Forwarded-Port: 8443\r\n",
            "https://apps.example.com:8443",
            false,
        ),
    ] {
        let xfh = if origin.ends_with(":9443") {
            "apps.example.com:9443"
        } else {
            "apps.example.com"
        };
        let fields = format!("X-Forwarded-Host: {xfh}\r\n{forwarded}Origin: {origin}\r\n{cookie}");
        let r = send_one(&w, &hostile("websocket", "internal:1", &fields));
        assert_eq!(
            r.status,
            if admitted { 200 } else { 403 },
            "{forwarded:?} {origin}: {}",
            r.text()
        );
    }
}

#[test]
fn wildcard_apps_cannot_drive_each_other_with_the_permit() {
    // The attack: a public app on a sibling subdomain (anyone's) serves a page whose
    // script opens a WebSocket to the victim's terminal; the browser attaches the
    // victim's permit (same site), so only the Origin tells the two apart.
    let term = Upstream::start();
    let evil = Upstream::start();
    let w = Worker::start(WorkerOpts {
        upstreams: vec![term.addr],
        extra: SECRETS.into(),
        worker_extra: "frontend_mode = \"wildcard\"\nwildcard_domain = \".apps.test\"\nwildcard_traffic_port = {PORT}".into(),
        circuit_extra: format!(
            "{INTERACTIVE}\nuser_id = \"{USER}\"\nfrontend_mode = \"wildcard\"\nsubdomain = \"term\"\n\n[[circuits]]\nid = \"c0a8f5d2-1111-4222-8333-444455550002\"\nfrontend_mode = \"wildcard\"\nsubdomain = \"evil\"\nopen_to_public = true\nroute_info = [{{ session_id = \"5d6c8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b\", kernel_host = \"127.0.0.1\", kernel_port = {} }}]\n",
            evil.addr.port()
        ),
        ..Default::default()
    });
    let cookie = permit_cookie();
    let port = w.port;
    let victim = format!("term.apps.test:{port}");
    for kind in ["websocket", "post"] {
        let r = send_one(
            &w,
            &hostile(
                kind,
                &victim,
                &format!("Origin: http://evil.apps.test:{port}\r\n{cookie}"),
            ),
        );
        refused(&r, 403, "cross_origin");
        // The evil app itself is public: its own page reaches it with any cookie.
        let r = send_one(
            &w,
            &hostile(
                kind,
                &format!("evil.apps.test:{port}"),
                &format!("Origin: http://evil.apps.test:{port}\r\n{cookie}"),
            ),
        );
        assert_eq!(r.status, 200);
    }
    assert_eq!(term.count(), 0, "the victim's terminal got nothing");
    assert_eq!(evil.count(), 2);
    for kind in ["websocket", "post"] {
        let r = send_one(
            &w,
            &hostile(
                kind,
                &victim,
                &format!("Origin: http://TERM.apps.test:{port}\r\n{cookie}"),
            ),
        );
        assert_eq!(r.status, 200, "{kind}: the terminal's own page");
    }
    assert_eq!(term.count(), 2);
}

#[test]
fn http2_streams_get_the_same_origin_guard() {
    let up = Upstream::start();
    let w = worker(&up, &format!("{INTERACTIVE}\nuser_id = \"{USER}\""), "");
    let cookie = permit_cookie();
    let cookie = cookie.trim_end();
    let url = format!("http://127.0.0.1:{}/api/kernels", w.port);
    // `:authority` comes from the URL, or from a Host field when one is given. The
    // requests carry no body: a refusal answers before the body would be read and
    // the stream is then reset with NO_ERROR (RFC 9113 §8.1); with a body, curl 7.88
    // reported "(92) Stream error in the HTTP/2 framing layer" for about one refusal
    // in fifteen runs, when that reset met its upload. The guard does not look at the
    // method.
    for (host, origin, want) in [
        (None, format!("http://127.0.0.1:{}", w.port), "200"),
        (None, format!("http://evil.test:{}", w.port), "403"),
        (None, format!("http://127.0.0.1:{}", w.port + 1), "403"),
        (
            Some(format!("proxy.test:{}", w.port)),
            format!("http://proxy.test:{}", w.port),
            "200",
        ),
        (
            Some(format!("proxy.test:{}", w.port)),
            format!("http://127.0.0.1:{}", w.port),
            "403",
        ),
        (None, "null".to_owned(), "403"),
    ] {
        let before = up.count();
        let origin_field = format!("Origin: {origin}");
        let mut args = vec![
            "-sS",
            "--max-time",
            "30",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            "-H",
            origin_field.as_str(),
            "-H",
            cookie,
        ];
        let host_field = host.as_ref().map(|h| format!("Host: {h}"));
        if let Some(h) = &host_field {
            args.extend(["-H", h.as_str()]);
        }
        args.push(&url);
        let out = std::process::Command::new("curl")
            .args(&args)
            .output()
            .expect("curl must be installed (.ci/run installs it)");
        let got = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            got,
            format!("2 {want}"),
            "{host:?} {origin}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let reached = if want == "200" { 1 } else { 0 };
        assert_eq!(up.count(), before + reached, "{host:?} {origin}");
    }
}

/// The API port answers `HEAD` as `GET` without the body (a client pipelining or
/// reusing the bytes after the head would take the JSON for its next answer), names
/// the methods it takes in its 405, and does not destroy its answer with a reset when
/// the client sent a body it never reads: a request larger than the sockets hold got
/// an RST in place of its 405.
#[test]
fn the_api_port_answers_head_without_a_body_and_other_methods_with_allow() {
    let up = Upstream::start();
    let w = worker(&up, "", "api_port = {AUX_PORT}");
    let api = std::net::SocketAddr::from(([127, 0, 0, 1], w.aux_port));

    for (path, status) in [
        ("/status", 200),
        ("/nowhere", 404),
        ("/setup", 400),
        ("/health/livez", 200),
        ("/readyz", 200),
    ] {
        let get = Client::connect(api).get(path, "");
        assert_eq!(get.status, status, "GET {path}: {}", get.text());
        assert!(!get.body.is_empty());
        let mut c = Client::connect(api);
        c.send(format!("HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        let (got, headers) = c.head();
        assert_eq!(got, status, "HEAD {path}");
        let length = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.clone());
        assert_eq!(
            length,
            Some(get.body.len().to_string()),
            "HEAD {path} names the length a GET gets"
        );
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut c.reader, &mut rest).expect("read to close");
        assert!(rest.is_empty(), "HEAD {path} got a body: {rest:?}");
    }

    // A HEAD refused before its head is whole (a bad field name) gets no body either.
    // So with empty lines before it, which the parser skips.
    for raw in [
        &b"HEAD /status HTTP/1.1\r\nHost: t\r\nBad Name: x\r\n\r\n"[..],
        b"\r\nHEAD /status HTTP/1.1\r\nHost: t\r\nBad Name: x\r\n\r\n",
    ] {
        let mut c = Client::connect(api);
        c.send(raw);
        let (got, _) = c.head();
        assert_eq!(got, 400);
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut c.reader, &mut rest).expect("read to close");
        assert!(rest.is_empty(), "a refused HEAD got a body: {rest:?}");
    }

    for method in ["OPTIONS", "DELETE", "PUT"] {
        let mut c = Client::connect(api);
        c.send(format!("{method} /status HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        let r = c.response();
        assert_eq!(r.status, 405, "{method}");
        assert_eq!(r.header("allow"), Some("GET, HEAD"), "{method}");
        assert_eq!(r.json()["code"], "method_not_allowed");
    }

    // A POST of 8 MiB: the worker answers after the head and never reads the body;
    // the client writes it all, then reads. Closed with the body unread, the kernel
    // answered the rest with a reset that destroyed the 405.
    let mut s = std::net::TcpStream::connect(api).expect("connect");
    s.set_write_timeout(Some(std::time::Duration::from_secs(20)))
        .expect("timeout");
    let body = vec![b'x'; 8 << 20];
    let head = format!(
        "POST /status HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    std::io::Write::write_all(&mut s, head.as_bytes()).expect("head");
    std::io::Write::write_all(&mut s, &body).expect("the body is taken, read or not");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let got = common::read_until_closed(&mut s);
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 405 "),
        "the answer survives the unread body: {text:?}"
    );
    assert!(text.contains("\r\nAllow: GET, HEAD\r\n"), "{text}");
    assert_eq!(up.count(), 0);
}
