//! The Redis subscription loop both sides run: subscribe to channels, hand every
//! message to a handler, and when the connection fails or drops, reconnect with a
//! capped backoff — forever, until a callback says stop. Every wait is bounded (a
//! Redis that accepts the connection and then says nothing counts as a failure after
//! [`Follow::connect_timeout`]); each reconnection is logged and reported to a
//! callback (the caller's counter). A subscription that goes silent — the
//! connection dropped somewhere without a reset (a NAT or firewall forgetting it, a
//! failed-over address), so no message and no error ever comes — is found by a
//! `PING` every [`Follow::ping_every`] that must be answered within
//! [`Follow::ping_timeout`], and replaced.

use std::time::Duration;

use futures_lite::StreamExt as _;

/// What to follow and how patiently.
#[derive(Debug, Clone)]
pub struct Follow<'a> {
    /// The Redis URL.
    pub url: &'a str,
    /// The channels to subscribe to.
    pub channels: &'a [&'a str],
    /// What the subscription is for, in the logs (`circuit events`, …).
    pub what: &'a str,
    /// The wait after the first failure; doubled after each further one.
    pub first_backoff: Duration,
    /// The longest wait between tries.
    pub max_backoff: Duration,
    /// Connecting and subscribing together take at most this long.
    pub connect_timeout: Duration,
    /// How often a quiet subscription is asked whether it is still there.
    pub ping_every: Duration,
    /// How long that question may go unanswered before the subscription is taken
    /// for dead and opened again.
    pub ping_timeout: Duration,
}

impl<'a> Follow<'a> {
    /// `channels` on `url`: retries after 250 ms, then 500 ms, then every second; a
    /// connection and subscription may take 10 s; a `PING` every 10 s, answered
    /// within 5 s.
    pub fn new(url: &'a str, channels: &'a [&'a str], what: &'a str) -> Self {
        Self {
            url,
            channels,
            what,
            first_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(10),
            ping_every: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(5),
        }
    }

    /// Subscribes and follows until a callback returns false. `on_subscribed` runs
    /// after every (re)subscription (and logs it) — what was published meanwhile is
    /// lost to pub/sub, so callers resynchronise there; `on_message` gets each message's
    /// channel and text payload (a payload that is not text is skipped);
    /// `on_reconnect` runs once per failed try or dropped subscription.
    pub async fn run(
        &self,
        mut on_subscribed: impl FnMut() -> bool,
        mut on_message: impl FnMut(&str, String) -> bool,
        mut on_reconnect: impl FnMut(),
    ) {
        let mut backoff = self.first_backoff;
        loop {
            let pubsub = match self.subscribe().await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, what = self.what, retry_in_ms = backoff.as_millis() as u64,
                        "event subscription failed; retrying");
                    on_reconnect();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.max_backoff);
                    continue;
                }
            };
            backoff = self.first_backoff;
            if !on_subscribed() {
                return;
            }
            let (mut sink, mut messages) = pubsub.split();
            let every = self.ping_every.max(Duration::from_millis(10));
            let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    msg = messages.next() => {
                        let Some(msg) = msg else {
                            tracing::warn!(what = self.what, "event subscription dropped; reconnecting");
                            break;
                        };
                        let Ok(text) = msg.get_payload::<String>() else {
                            continue;
                        };
                        if !on_message(msg.get_channel_name(), text) {
                            return;
                        }
                    }
                    _ = ping.tick() => {
                        let answered = tokio::time::timeout(
                            self.ping_timeout,
                            sink.ping::<redis::Value>(),
                        )
                        .await;
                        if !matches!(answered, Ok(Ok(_))) {
                            tracing::warn!(
                                what = self.what,
                                timeout_ms = self.ping_timeout.as_millis() as u64,
                                "event subscription silent (no answer to PING); reconnecting"
                            );
                            break;
                        }
                    }
                }
            }
            on_reconnect();
        }
    }

    async fn subscribe(&self) -> Result<redis::aio::PubSub, String> {
        let subscribed = async {
            let client = redis::Client::open(self.url)?;
            let mut pubsub = client.get_async_pubsub().await?;
            for channel in self.channels {
                pubsub.subscribe(*channel).await?;
            }
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(self.connect_timeout, subscribed).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer within {} s",
                self.connect_timeout.as_secs()
            )),
        }
    }
}
