//! Pages and sets of pages (the dirty bitmap's shape: bit `i` of word `i / 64` is page `i`,
//! as KVM's dirty log and vm-memory's `AtomicBitmap` both lay it out).

/// Guest page size: the unit of dirty tracking and of transfer.
pub const PAGE_SIZE: usize = 4096;

/// A page of zeros.
pub const ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// A set of page numbers below a fixed count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
    pages: usize,
}

impl PageSet {
    /// The empty set over `pages` pages.
    pub fn new(pages: usize) -> Self {
        PageSet {
            words: vec![0; pages.div_ceil(64)],
            pages,
        }
    }

    /// Every page.
    pub fn full(pages: usize) -> Self {
        let mut s = PageSet::new(pages);
        for p in 0..pages {
            s.insert(p as u64);
        }
        s
    }

    /// A set from bitmap words; bits beyond `pages` are dropped.
    pub fn from_words(mut words: Vec<u64>, pages: usize) -> Self {
        words.resize(pages.div_ceil(64), 0);
        let mut s = PageSet { words, pages };
        s.trim();
        s
    }

    fn trim(&mut self) {
        let tail = self.pages % 64;
        if tail != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
    }

    /// Adds every page of `words` (a bitmap of the same layout).
    pub fn union_words(&mut self, words: &[u64]) {
        for (w, o) in self.words.iter_mut().zip(words) {
            *w |= o;
        }
        self.trim();
    }

    /// Adds every page of `other`.
    pub fn union(&mut self, other: &PageSet) {
        self.union_words(&other.words);
    }

    /// Removes every page of `other`.
    pub fn subtract(&mut self, other: &PageSet) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w &= !o;
        }
    }

    /// Adds a page; pages beyond the set's range are ignored.
    pub fn insert(&mut self, page: u64) {
        if (page as usize) < self.pages {
            self.words[page as usize / 64] |= 1 << (page % 64);
        }
    }

    /// Removes a page.
    pub fn remove(&mut self, page: u64) {
        if (page as usize) < self.pages {
            self.words[page as usize / 64] &= !(1 << (page % 64));
        }
    }

    /// Whether a page is in the set.
    pub fn contains(&self, page: u64) -> bool {
        (page as usize) < self.pages && self.words[page as usize / 64] & (1 << (page % 64)) != 0
    }

    /// Number of pages in the set.
    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// The range the set covers.
    pub fn capacity(&self) -> usize {
        self.pages
    }

    /// The pages, in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(i as u64 * 64 + bit)
            })
        })
    }

    /// The pages as a list.
    pub fn to_vec(&self) -> Vec<u64> {
        self.iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_operations() {
        let mut a = PageSet::new(130);
        for p in [0, 63, 64, 129, 500] {
            a.insert(p);
        }
        assert_eq!(a.to_vec(), vec![0, 63, 64, 129]);
        let b = PageSet::from_words(vec![1, 0, u64::MAX], 130);
        assert_eq!(b.to_vec(), vec![0, 128, 129]);
        let mut c = a.clone();
        c.subtract(&b);
        assert_eq!(c.to_vec(), vec![63, 64]);
        c.union(&b);
        assert_eq!(c.len(), 5);
        assert!(c.contains(128) && !c.contains(1));
        assert_eq!(PageSet::full(70).len(), 70);
    }
}
