from __future__ import annotations

import factory
from django.contrib.auth import get_user_model
from factory.declarations import Sequence


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        skip_postgeneration_save = True

    username = Sequence(lambda n: f"user{n}")
    password = factory.django.Password("pw")
