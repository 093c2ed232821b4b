"""Every query of the auth service."""

from __future__ import annotations

from collections.abc import Iterable

from sqlmodel import Session, col, select

from auth.models import User


def get_user(session: Session, user_id: int) -> User | None:
    return session.get(User, user_id)


def get_user_by_email(session: Session, email: str) -> User | None:
    return session.exec(select(User).where(User.email == email)).first()


def get_users(session: Session, ids: Iterable[int]) -> list[User]:
    wanted = sorted(set(ids))
    if not wanted:
        return []
    return list(session.exec(select(User).where(col(User.id).in_(wanted)).order_by(col(User.id))))


def add_user(session: Session, user: User) -> User:
    session.add(user)
    session.flush()
    return user
