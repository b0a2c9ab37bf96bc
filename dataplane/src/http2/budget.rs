//! The core's budget of streams to apps (`[http2] max_app_streams`): the places
//! client addresses hold, shared fairly, and the making of room when every place
//! is taken.
//!
//! A stream from an HTTP/2 client to an app, and an HTTP/1.1 request bridged to an
//! HTTP/2 app, holds a place for its life: its parsed head, the window the worker
//! may buffer from an app whose client does not read, an app connection or stream.
//! Until half the places are taken an address takes as many as it asks for; past
//! half, an address holding its share (`max_app_streams_per_address`) gets no more.
//!
//! When every place is taken, a stream of an address holding fewer places than the
//! address holding most (by more than the one it asks for) takes one of that
//! address's: the one whose stream moved no bytes for longest is ended
//! ([`Activity::ended`]). So no set of addresses keeps another address from holding
//! as many places as each of them does, whatever their streams do to hold their
//! places (wait for a body, trickle one, wait on an app, never read the answer):
//! before, the first address took half the budget and four more their shares, and
//! five addresses (one IPv6 /56) refused every other client of the core. Between
//! addresses holding as many places, or one fewer, nothing is taken, so streams are
//! not ended in turn, and a stream of an address holding one place is ended only
//! for an address holding none when no address holds two. What the rule cannot
//! give: a place to a client when as many addresses as places (an IPv6 /53's /64s)
//! hold one each; the budget bounds memory, and the core is then full.
//!
//! Pure bookkeeping (no I/O, no clock of its own): the stream tells its
//! [`Activity`]; the caller ends the stream whose place was taken.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::time::Instant;

use appproxy_shared::fair_share::{ClientKey, Refused};

use crate::signal::Signal;

/// What a stream holding a place did last, and how it is told its place was taken.
pub struct Activity {
    /// When its last bytes moved, either way (its start until then).
    last: Cell<Instant>,
    /// Whether its answer's head went to the client: a stream ended after it is
    /// reset, one ended before answered 503.
    responded: Cell<bool>,
    /// Fired when its place was taken to make room.
    ended: Signal,
}

impl Activity {
    /// A stream's, started `now`.
    pub fn new(now: Instant) -> Rc<Self> {
        Rc::new(Self {
            last: Cell::new(now),
            responded: Cell::new(false),
            ended: Signal::default(),
        })
    }

    /// Bytes of the stream moved `now` (its body taken from the client or given to
    /// the app, its answer given to the client).
    pub fn moved(&self, now: Instant) {
        self.last.set(now);
    }

    /// The answer's head went to the client.
    pub fn responded(&self) {
        self.responded.set(true);
    }

    /// Whether the answer's head went to the client.
    pub fn has_responded(&self) -> bool {
        self.responded.get()
    }

    /// Resolves once the stream's place was taken to make room for another's.
    pub async fn ended(&self) {
        self.ended.fired().await;
    }

    /// Tells the stream its place was taken.
    pub fn end(&self) {
        self.ended.fire();
    }
}

/// A place in the [`Budget`]: whose, and which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    key: ClientKey,
    id: u64,
}

/// The places of one core, by client address.
pub struct Budget {
    max: usize,
    per_address: usize,
    total: usize,
    /// Each address's places (an address leaves with its last), by place.
    held: HashMap<ClientKey, BTreeMap<u64, Rc<Activity>>>,
    /// Every address holding places, by how many: the last holds most.
    by_count: BTreeSet<(usize, ClientKey)>,
    next: u64,
}

impl Budget {
    /// `max` places (at least 1); once half are taken, `per_address` (at least 1)
    /// for an address.
    pub fn new(max: usize, per_address: usize) -> Self {
        Self {
            max: max.max(1),
            per_address: per_address.max(1),
            total: 0,
            held: HashMap::new(),
            by_count: BTreeSet::new(),
            next: 0,
        }
    }

    /// A place for a stream of the client at `key`, whose activity is `activity`;
    /// with it, the activity of the stream whose place was taken to make room, for
    /// the caller to end ([`Activity::end`]). Refused `AddressShare` past half the
    /// budget when the address holds its share, `Full` when every place is taken
    /// and no address holds more than one more than this one would.
    pub fn take(
        &mut self,
        key: ClientKey,
        activity: &Rc<Activity>,
    ) -> Result<(Place, Option<Rc<Activity>>), Refused> {
        let mine = self.count(key);
        if self.total >= self.max / 2 && mine >= self.per_address {
            return Err(Refused::AddressShare);
        }
        let ended = if self.total >= self.max {
            Some(self.make_room(mine).ok_or(Refused::Full)?)
        } else {
            None
        };
        self.next += 1;
        let place = Place { key, id: self.next };
        self.held
            .entry(key)
            .or_default()
            .insert(place.id, activity.clone());
        self.recount(key, mine, mine + 1);
        self.total += 1;
        Ok((place, ended))
    }

    /// Gives `place` back (nothing when it was taken to make room).
    pub fn give_back(&mut self, place: Place) {
        self.remove(place);
    }

    /// Places taken now.
    pub fn taken(&self) -> usize {
        self.total
    }

    /// An address's share once half the places are taken.
    pub fn per_address(&self) -> usize {
        self.per_address
    }

    /// Places held by `key`.
    fn count(&self, key: ClientKey) -> usize {
        self.held.get(&key).map_or(0, BTreeMap::len)
    }

    /// Takes, for an address holding `mine`, the place of the address holding most
    /// whose stream moved no bytes for longest (the earliest taken among equals),
    /// when that address holds more than `mine + 1`: its stream's activity.
    fn make_room(&mut self, mine: usize) -> Option<Rc<Activity>> {
        let &(most, key) = self.by_count.last()?;
        if most <= mine + 1 {
            return None;
        }
        let id = self
            .held
            .get(&key)?
            .iter()
            .min_by_key(|(id, a)| (a.last.get(), **id))
            .map(|(id, _)| *id)?;
        self.remove(Place { key, id })
    }

    /// Removes `place`: its stream's activity, when it was still held.
    fn remove(&mut self, place: Place) -> Option<Rc<Activity>> {
        let places = self.held.get_mut(&place.key)?;
        let activity = places.remove(&place.id)?;
        let left = places.len();
        if left == 0 {
            self.held.remove(&place.key);
        }
        self.recount(place.key, left + 1, left);
        self.total -= 1;
        Some(activity)
    }

    /// Moves `key` from `from` places to `to` in [`Budget::by_count`].
    fn recount(&mut self, key: ClientKey, from: usize, to: usize) {
        if from > 0 {
            self.by_count.remove(&(from, key));
        }
        if to > 0 {
            self.by_count.insert((to, key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(last: u8) -> ClientKey {
        ClientKey::of(std::net::IpAddr::from([10, 0, 0, last]))
    }

    /// A budget and the clock its streams move on.
    struct Fixture {
        budget: Budget,
        start: Instant,
        /// Each place taken, with its stream's activity.
        places: Vec<(Place, Rc<Activity>)>,
    }

    impl Fixture {
        fn new(max: usize, per_address: usize) -> Self {
            Self {
                budget: Budget::new(max, per_address),
                start: Instant::now(),
                places: Vec::new(),
            }
        }

        fn at(&self, secs: u64) -> Instant {
            self.start + Duration::from_secs(secs)
        }

        /// A stream of `from` started at `secs`: the index of its place, and
        /// the index of the stream ended to make room, if one was.
        fn take(&mut self, from: u8, secs: u64) -> Result<(usize, Option<usize>), Refused> {
            let activity = Activity::new(self.at(secs));
            let (place, ended) = self.budget.take(key(from), &activity)?;
            let ended = ended.map(|e| {
                e.end();
                self.places
                    .iter()
                    .position(|(_, a)| Rc::ptr_eq(a, &e))
                    .expect("a place of this fixture")
            });
            self.places.push((place, activity));
            Ok((self.places.len() - 1, ended))
        }

        fn taken_by(&self, from: u8) -> usize {
            self.budget.count(key(from))
        }
    }

    #[test]
    fn an_address_takes_what_it_asks_until_half_then_its_share() {
        let mut f = Fixture::new(8, 1);
        for _ in 0..4 {
            assert!(f.take(1, 0).is_ok());
        }
        assert_eq!(f.take(1, 0), Err(Refused::AddressShare));
        assert_eq!(f.take(2, 0).map(|t| t.1), Ok(None));
        assert_eq!(f.take(2, 0), Err(Refused::AddressShare));
        assert_eq!(f.budget.taken(), 5);
    }

    /// Five addresses fill the budget (the first with half of it); a sixth takes
    /// a place of the first, the one that moved no bytes for longest, and the
    /// first cannot take it back, nor can the others take each other's.
    #[test]
    fn a_full_budget_makes_room_from_the_address_holding_most() {
        let mut f = Fixture::new(8, 1);
        for s in 0..4 {
            f.take(1, s).expect("half the budget");
        }
        for a in 2..=5 {
            f.take(a, 10).expect("a share");
        }
        assert_eq!(f.budget.taken(), 8);
        // The first address's streams: the third moves on, the first and second
        // (started first) too, the fourth (started last) not since its start.
        f.places[0].1.moved(f.at(20));
        f.places[1].1.moved(f.at(21));
        f.places[2].1.moved(f.at(22));
        let (_, ended) = f.take(6, 30).expect("room made");
        assert_eq!(ended, Some(3), "the stream idle longest");
        let told = futures_lite::future::poll_once(f.places[3].1.ended());
        assert!(
            futures_lite::future::block_on(told).is_some(),
            "told it ended"
        );
        assert_eq!((f.taken_by(1), f.taken_by(6)), (3, 1));
        assert_eq!(f.budget.taken(), 8);
        // Its holder, and the holders of one place each, take nothing back: no
        // address holds more than one more than they would.
        assert_eq!(f.take(2, 31), Err(Refused::AddressShare));
        assert_eq!(f.take(7, 31).map(|t| t.1), Ok(Some(0)));
        assert_eq!(f.take(8, 31).map(|t| t.1), Ok(Some(1)));
        assert_eq!(f.taken_by(1), 1);
        assert_eq!(f.take(9, 31), Err(Refused::Full));
        // The stream ended gives back nothing more than it held.
        let (place, _) = f.places[3];
        f.budget.give_back(place);
        assert_eq!(f.budget.taken(), 8);
        let (place, _) = f.places[2];
        f.budget.give_back(place);
        assert_eq!((f.budget.taken(), f.taken_by(1)), (7, 0));
        assert!(f.budget.by_count.iter().all(|&(n, _)| n == 1));
        assert_eq!(f.budget.by_count.len(), 7);
    }

    /// Equal holders never end each other's streams: a flood from addresses under
    /// their share ends the places of the one holding most, never a stream of an
    /// address holding one (an upload whose body comes late).
    #[test]
    fn holders_of_about_as_many_take_nothing_from_each_other() {
        let mut f = Fixture::new(12, 4);
        f.take(9, 0).expect("an upload");
        for round in 0..3 {
            for a in 1..=4 {
                let _ = f.take(a, round);
            }
        }
        assert_eq!(f.budget.taken(), 12);
        let mut ended = Vec::new();
        for round in 3..20 {
            for a in 1..=4 {
                if let Ok((_, Some(e))) = f.take(a, round) {
                    ended.push(e);
                }
            }
        }
        assert!(ended.is_empty(), "{ended:?}");
        assert_eq!(f.taken_by(9), 1);
        // A newcomer takes from one of the flood's addresses, not the upload.
        let (_, ended) = f.take(10, 30).expect("room made");
        assert_ne!(ended, Some(0));
        assert_eq!(f.taken_by(9), 1);
    }

    /// One address of one place each everywhere: nobody holds more, nothing is
    /// taken.
    #[test]
    fn a_budget_held_one_place_per_address_makes_no_room() {
        let mut f = Fixture::new(4, 1);
        for a in 1..=4 {
            f.take(a, 0).expect("a place");
        }
        assert_eq!(f.take(5, 1), Err(Refused::Full));
        assert_eq!(f.budget.taken(), 4);
    }

    /// IPv6 clients are counted by /64: one host's addresses hold one share.
    #[test]
    fn an_ipv6_prefix_is_one_holder() {
        let mut b = Budget::new(4, 1);
        let now = Instant::now();
        let a = Activity::new(now);
        for last in 1..=2u16 {
            let ip = std::net::IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, last]);
            b.take(ClientKey::of(ip), &a).expect("a place");
        }
        let ip = std::net::IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 9]);
        assert_eq!(
            b.take(ClientKey::of(ip), &a).err(),
            Some(Refused::AddressShare)
        );
    }
}
