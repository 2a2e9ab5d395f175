//! Which free slot an instance gets: the bounded, release-ordered list of a thread's free
//! slots and the choice among them, over plain data so that they are tested without
//! mapping anything (as wasmtime's `index_allocator` is). What a slot shows and what it
//! costs to change is [`super::slot`]'s business; it describes each slot as a [`Fit`].

/// How a free slot of the right size stands towards the image an instance wants, from
/// cheapest to reuse to dearest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fit {
    /// It already shows the wanted image (or nothing, and no image is wanted): the instance
    /// starts without a syscall.
    Same,
    /// It shows no image: the wanted one is mapped over page-less anonymous memory.
    Blank,
    /// It shows an image whose module is gone: blanking it loses nothing anyone wants.
    Orphaned,
    /// It shows another live module's image: blanking it costs that module a remap the
    /// next time it starts on this thread.
    Other,
}

/// The index of the slot to reuse, given each free slot's [`Fit`] in release order (least
/// recently released first; `None` for a slot that cannot serve, being of another size),
/// or `None` when none can serve.
///
/// The most recently released [`Fit::Same`] slot, else the least recently released
/// [`Fit::Blank`] one, else the least recently released [`Fit::Orphaned`] one, else the
/// least recently released slot at all.
pub(super) fn choose(fits: impl IntoIterator<Item = Option<Fit>>) -> Option<usize> {
    let (mut same, mut blank, mut orphaned, mut other) = (None, None, None, None);
    for (index, fit) in fits.into_iter().enumerate() {
        match fit {
            None => {}
            Some(Fit::Same) => same = Some(index),
            Some(Fit::Blank) => {
                blank.get_or_insert(index);
            }
            Some(Fit::Orphaned) => {
                orphaned.get_or_insert(index);
            }
            Some(Fit::Other) => {
                other.get_or_insert(index);
            }
        }
    }
    same.or(blank).or(orphaned).or(other)
}

/// At most `capacity` free slots, least recently released first.
#[derive(Debug)]
pub(super) struct FreeList<T> {
    slots: Vec<T>,
    capacity: usize,
}

impl<T> FreeList<T> {
    pub(super) const fn new(capacity: usize) -> Self {
        FreeList {
            slots: Vec::new(),
            capacity,
        }
    }

    /// How many slots the list holds.
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Adds a just-released slot as the most recent one; `Err` gives it back when the list
    /// is full (the caller then lets it go).
    pub(super) fn push(&mut self, slot: T) -> Result<(), T> {
        if self.slots.len() >= self.capacity {
            return Err(slot);
        }
        self.slots.push(slot);
        Ok(())
    }

    /// Removes and returns the slot [`choose`] picks, `fit` describing each slot; the
    /// others keep their order.
    pub(super) fn take(&mut self, fit: impl FnMut(&T) -> Option<Fit>) -> Option<T> {
        let index = choose(self.slots.iter().map(fit))?;
        Some(self.slots.remove(index))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A stand-in slot: a name to tell slots apart, and its fit.
    type Fake = (&'static str, Option<Fit>);

    fn list(slots: &[Fake]) -> FreeList<Fake> {
        let mut list = FreeList::new(16);
        for slot in slots {
            list.push(*slot).expect("room");
        }
        list
    }

    fn take(list: &mut FreeList<Fake>) -> Option<&'static str> {
        list.take(|(_, fit)| *fit).map(|(name, _)| name)
    }

    #[test]
    fn the_most_recent_slot_showing_the_image_wins_over_everything() {
        let mut slots = list(&[
            ("blank", Some(Fit::Blank)),
            ("same, older", Some(Fit::Same)),
            ("orphaned", Some(Fit::Orphaned)),
            ("same, newer", Some(Fit::Same)),
            ("other", Some(Fit::Other)),
            ("other size", None),
        ]);
        assert_eq!(take(&mut slots), Some("same, newer"));
        assert_eq!(take(&mut slots), Some("same, older"));
    }

    #[test]
    fn without_the_image_the_oldest_blank_then_orphaned_then_other_slot_is_taken() {
        let mut slots = list(&[
            ("other, oldest", Some(Fit::Other)),
            ("orphaned, older", Some(Fit::Orphaned)),
            ("blank, older", Some(Fit::Blank)),
            ("orphaned, newer", Some(Fit::Orphaned)),
            ("blank, newer", Some(Fit::Blank)),
            ("other, newer", Some(Fit::Other)),
        ]);
        let order: Vec<_> = std::iter::from_fn(|| take(&mut slots)).collect();
        assert_eq!(
            order,
            [
                "blank, older",
                "blank, newer",
                "orphaned, older",
                "orphaned, newer",
                "other, oldest",
                "other, newer",
            ]
        );
        assert_eq!(slots.len(), 0);
    }

    #[test]
    fn a_slot_of_another_size_is_never_taken() {
        assert_eq!(choose([None, None]), None);
        assert_eq!(choose([]), None);
        let mut slots = list(&[("other size", None), ("blank", Some(Fit::Blank))]);
        assert_eq!(take(&mut slots), Some("blank"));
        assert_eq!(take(&mut slots), None);
        assert_eq!(slots.len(), 1, "the unfit slot stays listed");
    }

    #[test]
    fn the_list_is_capped_and_gives_back_what_does_not_fit() {
        let mut slots = FreeList::new(2);
        assert_eq!(slots.push(1), Ok(()));
        assert_eq!(slots.push(2), Ok(()));
        assert_eq!(slots.push(3), Err(3));
        assert_eq!(slots.len(), 2);
        assert_eq!(slots.take(|_| Some(Fit::Other)), Some(1));
        assert_eq!(slots.push(3), Ok(()));
        assert_eq!(slots.len(), 2);
    }

    #[test]
    fn taking_keeps_the_release_order_of_the_rest() {
        let mut slots = FreeList::new(8);
        for slot in 0..6 {
            slots.push(slot).unwrap();
        }
        // Take 2 (the only one showing the image); released again, it is the most recent.
        assert_eq!(
            slots.take(|slot| Some(if *slot == 2 { Fit::Same } else { Fit::Other })),
            Some(2)
        );
        slots.push(2).unwrap();
        // Every slot the same: the most recent is 2, then 5, 4, ...
        let order: Vec<_> = std::iter::from_fn(|| slots.take(|_| Some(Fit::Same))).collect();
        assert_eq!(order, [2, 5, 4, 3, 1, 0]);
    }

    fn fit() -> impl Strategy<Value = Option<Fit>> {
        prop_oneof![
            Just(None),
            Just(Some(Fit::Same)),
            Just(Some(Fit::Blank)),
            Just(Some(Fit::Orphaned)),
            Just(Some(Fit::Other)),
        ]
    }

    /// The choice as it was first written, one pass per preference over the slots.
    fn reference(fits: &[Option<Fit>]) -> Option<usize> {
        fits.iter()
            .rposition(|fit| *fit == Some(Fit::Same))
            .or_else(|| fits.iter().position(|fit| *fit == Some(Fit::Blank)))
            .or_else(|| fits.iter().position(|fit| *fit == Some(Fit::Orphaned)))
            .or_else(|| fits.iter().position(Option::is_some))
    }

    proptest! {
        #[test]
        fn the_choice_matches_the_preference_order(fits in prop::collection::vec(fit(), 0..20)) {
            prop_assert_eq!(choose(fits.iter().copied()), reference(&fits));
        }
    }
}
