"""The embedded amqtt broker with tomq's authentication and topic ACL, and the mosquitto config emitter."""
