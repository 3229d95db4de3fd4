// A doubly linked list threaded through the caller's own records by index: an LRU order with no
// allocation, whose links sit beside whatever else a record holds. Each record has `prev` and
// `next` members (-1: none); at(i) returns record i. The list itself keeps only its two ends.
#pragma once

namespace nosa::memory {

template <class Index>
struct IndexList {
  Index head = -1;  // the oldest end
  Index tail = -1;  // the most recent end

  template <class At>
  void unlink(Index i, At&& at) {
    auto& x = at(i);
    if (x.prev >= 0) at(x.prev).next = x.next; else head = x.next;
    if (x.next >= 0) at(x.next).prev = x.prev; else tail = x.prev;
    x.prev = x.next = -1;
  }

  template <class At>
  void push_back(Index i, At&& at) {
    auto& x = at(i);
    x.prev = tail;
    x.next = -1;
    if (tail >= 0) at(tail).next = i; else head = i;
    tail = i;
  }

  template <class At>
  void push_front(Index i, At&& at) {
    auto& x = at(i);
    x.next = head;
    x.prev = -1;
    if (head >= 0) at(head).prev = i; else tail = i;
    head = i;
  }
};

}  // namespace nosa::memory
